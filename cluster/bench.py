"""``raylight bench generation``: the generator actor (vLLM) against plain HF ``generate``.

Same model, adapter (version 0), prompts and sampling settings, in one run; each side is warmed
up once before it is timed. Tokens per second count the tokens each side actually generated.
"""

from __future__ import annotations

import logging
import time

import ray

from cluster.config import Config
from cluster.driver import init_ray, start_generator
from learners.policy import Policy, LoraSettings
from rollout.arithmetic import ArithmeticTask
from rollout.contracts import WeightUpdate, SamplingSettings
from rollout.engines import EngineSettings
from rollout.generator import Generator
from rollout.models import resolve_model
from rollout.prompts import render_prompts

logger = logging.getLogger(__name__)


def _timed(generate, prompts, sampling) -> tuple[float, int]:
    start = time.perf_counter()
    samples = generate(prompts, sampling)
    return time.perf_counter() - start, sum(len(s.completion.token_ids) for s in samples)


def bench_generation(model: str, n_prompts: int, n: int, max_tokens: int, dtype: str = "float32") -> dict:
    path = str(resolve_model(model))
    policy = Policy(path, LoraSettings())
    update = WeightUpdate(0, policy.weight_state(), policy.adapter_config())
    prompts = render_prompts(policy.tokenizer, ArithmeticTask(2).eval_set(n_prompts))
    sampling = SamplingSettings(n=n, temperature=1.0, max_tokens=max_tokens)
    del policy

    config = Config()
    init_ray(config)
    generator = start_generator(config, EngineSettings(model_path=path, dtype=dtype))
    ray.get(generator.load_weights.remote(update))
    ray.get(generator.generate.remote(prompts[:2], sampling))  # warm-up
    actor_seconds, actor_tokens = _timed(lambda p, s: ray.get(generator.generate.remote(p, s)), prompts, sampling)
    ray.kill(generator)
    logger.info("generator actor: %d tokens in %.1f s", actor_tokens, actor_seconds)

    hf = Generator(EngineSettings(model_path=path, kind="hf", dtype=dtype))  # same plain object, HF inside
    hf.load_weights(update)
    hf.generate(prompts[:2], SamplingSettings(n=2, max_tokens=4))  # warm-up
    hf_seconds, hf_tokens = _timed(hf.generate, prompts, sampling)
    logger.info("HF generate: %d tokens in %.1f s", hf_tokens, hf_seconds)
    actor_tps, hf_tps = actor_tokens / actor_seconds, hf_tokens / hf_seconds
    return {
        "benchmark": "generation",
        "model": model,
        "prompts": n_prompts,
        "n": n,
        "max_tokens": max_tokens,
        "dtype": dtype,
        "generator_actor_tokens_per_second": round(actor_tps, 1),
        "hf_generate_tokens_per_second": round(hf_tps, 1),
        "throughput_ratio": round(actor_tps / hf_tps, 2),
    }
