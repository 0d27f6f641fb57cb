"""The driver side of raylight, in rooms (docs/concepts.md#the-rooms-of-cluster; tests/test_layering.py keeps
each room to the rooms below it):

- ground floor: ``config`` (the config tree), ``phases`` (the phase schedule), ``stages`` (the
  loop's typed seams: prompts, model rewards, batch sources, evaluators, stateful parts);
- ``observe``: the health monitor, metric export, memory footprint, sample summaries;
- ``keeping``: the run keeper (start, resume, save, restore, rollback, recovery), checkpoints,
  the run directory;
- ``features``: run-level features that plug into the stages (Markovian CoT, the solution
  bank, the SAC surgery);
- ``loop``: the wiring of a run, the rollout stream, placement, evaluation, the driver's step;
- ``commands``: the command line, benchmarks, data checks, scoring files, reports.
"""
