"""The exit codes of the ``raylight`` commands (docs/exit-codes.md): what a shell, ``ray job
submit`` or a RayJob learns from a run's end."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What a ``raylight`` command's exit status means (a RayJob reports Succeeded only for 0)."""

    OK = 0  # the command did what it was asked: a run trained every step
    ERROR = 1  # an unexpected error (a traceback follows): a bug, or the environment
    USAGE = 2  # a config, file, dataset or command line the command cannot use; nothing ran
    FAULTS = 3  # faults past what the run absorbs (generators or learners lost); it stopped with a checkpoint
    MONITOR_STOP = 4  # the health monitor stopped the run (a stop rule fired, or rollbacks ran out)
    INTERRUPTED = 130  # Ctrl-C (SIGINT)


def exit_code_of(exc: BaseException) -> ExitCode:
    """What a run that ends by ``exc`` exits with: faults past what it absorbs, an interrupt,
    or an unexpected error."""
    from actors.generator import GeneratorsLost
    from actors.learner import LearnerFailure

    if isinstance(exc, (GeneratorsLost, LearnerFailure)):
        return ExitCode.FAULTS
    return ExitCode.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else ExitCode.ERROR
