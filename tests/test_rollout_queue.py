"""The rollout queue: run-ahead bound, order, and failures handed to the learner (threads, no Ray)."""

import threading
import time

import pytest

from rollout.queue import QueueClosed, Rollout, RolloutQueue


def test_sync_queue_lets_a_step_start_only_after_the_previous_one_is_released():
    queue = RolloutQueue(run_ahead=0)
    assert queue.may_start(1) and not queue.may_start(2)
    queue.release(1)
    assert queue.may_start(2) and not queue.may_start(3)


def test_run_ahead_k_lets_the_producer_work_k_steps_past_the_learner():
    queue = RolloutQueue(run_ahead=2, next_step=5)  # a resumed run: steps 1-4 done
    assert [s for s in range(5, 10) if queue.may_start(s)] == [5, 6, 7]
    queue.release(5)
    assert [s for s in range(5, 10) if queue.may_start(s)] == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="run_ahead"):
        RolloutQueue(run_ahead=-1)


def test_get_waits_for_its_step_and_takes_steps_by_number():
    queue = RolloutQueue(run_ahead=1)
    queue.put(Rollout(step=2, samples=[], verdicts=[]))
    threading.Timer(0.2, lambda: queue.put(Rollout(step=1, samples=[], verdicts=[]))).start()
    start = time.monotonic()
    assert queue.get(1).step == 1 and time.monotonic() - start >= 0.15
    assert queue.depth() == 1 and queue.get(2).step == 2 and queue.depth() == 0
    with pytest.raises(TimeoutError, match="step 3"):
        queue.get(3, timeout=0.1)


def test_a_producer_failure_and_a_close_reach_the_waiting_learner():
    queue = RolloutQueue(run_ahead=0)
    threading.Timer(0.1, lambda: queue.fail(ValueError("engine died"))).start()
    with pytest.raises(ValueError, match="engine died") as raised:
        queue.get(1)
    assert raised.value.__notes__ == ["(raised in the rollout producer thread)"]
    closing = RolloutQueue(run_ahead=0)
    threading.Timer(0.1, closing.close).start()
    with pytest.raises(QueueClosed):
        closing.get(1)
