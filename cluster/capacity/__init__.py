"""Capacity planning: whether a config's actors fit the machines before any of them starts.

``shapes``: a model's shape (from its ``config.json``, or a table of well-known Hub models) and
its parameter counts. ``memory``: pure functions over numbers, the bytes each part of an actor
takes. ``planner``: a config plus a machine description in, a plan (one row per actor, and the
problems that stop a run, each naming the key to change) out. The ``raylight plan`` command and
``raylight train``'s check before the actors start both read the planner (docs/capacity.md).
"""
