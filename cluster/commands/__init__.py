"""Commands: the ``raylight`` command line and what only it runs (benchmarks, data checks,
scoring files, run reports)."""
