"""Data-parallel learners: real Ray actors joined by torch.distributed (gloo on CPU).

Two learner actors each holding 4 of 8 samples must end with the same parameters as one learner
that saw all 8, and with identical parameters to each other. What cannot run here: nccl on
several GPUs; the same code path selects it when the actors hold GPUs.
"""

import sys

import pytest
import ray
import torch

from actors.learner import LearnerGroup, LearnerGroupSettings
from helpers import learner_settings
from learners.policy import LoraSettings

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_learner import random_batch  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LORA = LoraSettings(rank=4, alpha=8)

CASES = {
    "grpo-token-mean": {},
    "seq-mean-kl-loss": {"loss_agg": "seq-mean-token-mean", "kl_coef": 0.1},
    "reinforce++-whitened": {"advantage": "reinforce++", "kl_coef": 0.05, "kl_mode": "reward"},
    "gae-critic-2-epochs": {"advantage": "gae", "ppo_epochs": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_learners_on_4_plus_4_equal_one_on_8(ray_cluster, tiny_model_path, case):
    settings = learner_settings(tiny_model_path, LORA, lr=1e-2, micro_batch_size=2, threads=1, max_grad_norm=0.5, **CASES[case])
    batches = [random_batch(8, seed=s) for s in (0, 1)]
    single = LearnerGroup(settings, LearnerGroupSettings(num_learners=1, num_cpus=0.5))
    pair = LearnerGroup(settings, LearnerGroupSettings(num_learners=2, num_cpus=0.5))
    try:
        for batch in batches:
            one, two = single.step(batch), pair.step(batch)
            assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-4, abs=1e-6)
            assert two["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-4)
        reference = single.weight_update()
        ranks = ray.get([a.weight_update.remote() for a in pair.actors])
        assert [u.policy.version for u in ranks] == [2, 2] == [reference.policy.version] * 2
        digests = ray.get([a.parameter_digest.remote() for a in pair.actors])
        assert digests[0] == digests[1]  # bit-identical ranks
        # float sums in another order; Adam (~lr * g / (|g| + eps)) amplifies that noise where a
        # gradient is near zero, so compare at a tenth of one step (lr = 1e-2)
        for key, tensor in reference.tensors.items():
            torch.testing.assert_close(ranks[0].tensors[key], tensor, rtol=0, atol=1e-3)
        close = sum(torch.isclose(ranks[0].tensors[k], t, rtol=0, atol=1e-5).float().mean() for k, t in reference.tensors.items())
        assert close / len(reference.tensors) > 0.99
    finally:
        single.kill()
        pair.kill()

