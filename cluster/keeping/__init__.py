"""Run keeping: what happens between steps and is not the step (the run keeper), checkpoints
and the run directory."""
