"""The deploy/ files: the GPU smoke script runs its CPU path (the GPU path is the same
learner on ``cuda``; a session with a GPU runs it and reports the figures)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_smoke_script_trains_and_reports_throughput_without_ray_or_vllm(tmp_path):
    # the GPU machine has torch, transformers and peft only: ray and vllm must not be imported
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['ray'] = None\nsys.modules['vllm'] = None\n")
    command = [sys.executable, str(ROOT / "deploy" / "gpu_smoke.py"), "--model", "tiny", "--device", "cpu",
               "--steps", "2", "--batch", "4", "--prompt-len", "8", "--completion-len", "6", "--micro-batch", "2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tokens_per_step"] == 4 * (8 + 6) and report["tokens_per_second"] > 0
    assert report["losses_finite"] and report["training"] == "lora-r16"
    # LoRA: forward + backward to the inputs, about 4 x parameters x tokens (plus attention)
    assert 3 * report["parameters"] * 56 < report["model_flops_per_step"] < 6 * report["parameters"] * 56
    assert report["mfu"] is None  # no peak known for a CPU
