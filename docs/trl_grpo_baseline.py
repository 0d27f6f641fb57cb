"""TRL's GRPOTrainer on the work of configs/trl_grpo.yaml: the baseline of
docs/benchmarks.md#step-speed-and-memory. Not part of raylight (TRL is not a dependency); run it beside the project with

    pip install --no-deps --target /tmp/trl trl==1.16.0     # accelerate and datasets: in .venv
    PYTHONPATH=/tmp/trl .venv/bin/python docs/trl_grpo_baseline.py [--steps 6]

Same work: SmolLM2-135M-Instruct (the project's converted folder) with bf16 weights, LoRA
r8/alpha16 on q/k/v/o, arithmetic (difficulty 2) under the project's system prompt, 16 prompts
x 8 completions of at most 64 tokens at temperature 1.0, lr 1e-4, no KL (beta 0), token-mean
loss (TRL's "dapo"), 4 micro-batches of 32 and one optimizer step per batch, vLLM colocated in
this process (bf16, 1 GiB KV cache as the raylight config), TRL's default importance-sampling
correction. Prints the median seconds per step over steps 2.. and this process's peak memory
(RSS and the largest PSS sampled every second), last line JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29513",
                   "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():  # fmt: skip
    os.environ.setdefault(key, value)


def main() -> None:
    import psutil
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollout.models import resolve_model
    from rollout.prompts import DEFAULT_SYSTEM_PROMPT
    from rollout.tasks.arithmetic import ArithmeticTask

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    problems = ArithmeticTask(2).eval_set(16 * args.steps, "train")
    rows = [{"prompt": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": p.question}], "answer": p.answer} for p in problems]

    def correct(completions, answer, **kwargs):
        """1 when the completion's last number is the answer (raylight's numeric reward, simplified)."""
        out = []
        for completion, want in zip(completions, answer):
            numbers = re.findall(r"-?\d+(?:\.\d+)?", completion[0]["content"] if isinstance(completion, list) else completion)
            out.append(float(bool(numbers) and float(numbers[-1]) == float(want)))
        return out

    seconds: list[float] = []
    peak_pss = [0.0]
    stop = threading.Event()

    def sample_pss():
        me = psutil.Process()
        while not stop.is_set():
            peak_pss[0] = max(peak_pss[0], sum(p.memory_full_info().pss for p in [me, *me.children(recursive=True)]) / 2**30)
            stop.wait(1.0)

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            seconds.append(time.perf_counter() - self.start)
            print(f"step {len(seconds)}: {seconds[-1]:.1f} s", flush=True)

    from trl.generation.vllm_generation import VLLMGeneration

    def sync_weights(self):
        """TRL's colocated sync calls vLLM's ``model.load_weights``, which vLLM 0.32 refuses
        once the weights are processed ('Parameter' object has no attribute 'weight_loader');
        the same tensors go through ``reload_weights``, the in-place path raylight uses."""
        weights = {name: param.detach().clone() for name, param in self._iter_named_params()}
        self.llm.collective_rpc(lambda worker: worker.model_runner.reload_weights(weights_iterator=iter(weights.items())))
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights
    config = GRPOConfig(
        output_dir="/tmp/trl-grpo-baseline", max_steps=args.steps, per_device_train_batch_size=32, gradient_accumulation_steps=4,
        num_generations=8, max_completion_length=64, temperature=1.0, learning_rate=1e-4, beta=0.0, loss_type="dapo",
        num_iterations=1, use_cpu=True, bf16=True, model_init_kwargs={"dtype": "bfloat16"}, use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=1024, report_to="none", save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(resolve_model("smollm2")), reward_funcs=correct, args=config, train_dataset=Dataset.from_list(rows), peft_config=lora, callbacks=[Timer()])
    sampler = threading.Thread(target=sample_pss, daemon=True)
    sampler.start()
    trainer.train()
    stop.set()
    timed = seconds[1:]
    print(json.dumps({
        "benchmark": "trl_grpo", "steps_timed": len(timed), "step_seconds": round(statistics.median(timed), 2), "all_steps": [round(s, 1) for s in seconds],
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "peak_pss_gib": round(peak_pss[0], 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
