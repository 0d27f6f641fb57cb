"""Devices and their state: torch's random state kept per device (the GPUs' too, where there
are GPUs; here only the CPU branch runs, and a checkpoint naming GPUs this process lacks)."""

from __future__ import annotations

import logging

import torch

from learners.learner import rng_state, set_rng_state


def test_the_random_state_comes_back_exactly():
    saved = rng_state()
    expected = torch.rand(4)
    torch.rand(100)  # the stream moves on
    set_rng_state(saved)
    assert torch.equal(torch.rand(4), expected)


def test_a_checkpoint_from_before_the_gpu_states_were_kept_still_loads():
    saved = torch.get_rng_state()  # what checkpoints held before: the CPU state alone
    expected = torch.rand(3)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected)


def test_gpu_states_this_process_cannot_take_are_named_and_the_cpu_state_restored(caplog):
    saved = rng_state() | {"cuda": [torch.zeros(16, dtype=torch.uint8)] * (torch.cuda.device_count() + 1)}
    expected = torch.rand(2)
    with caplog.at_level(logging.WARNING):
        set_rng_state(saved)
    assert torch.equal(torch.rand(2), expected)
    assert f"random state of {torch.cuda.device_count() + 1} GPUs" in caplog.text
