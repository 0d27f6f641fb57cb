"""The loop: wiring a run (actors, placement, stages), the rollout stream, evaluation and the
driver's step."""
