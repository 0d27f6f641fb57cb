"""``raylight export``: a run's policy as a folder transformers and PEFT load with the same
outputs as the trained policy (adapter, merged, with the surgeon's attention scales folded
in), a checkpoint's policy, the model card, and the Hub upload as a dry run. The run directory
is written here (config, metrics, a random non-zero adapter on the tiny model): no training.
vLLM loading the exported adapter: test_integration's final-adapter test."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from cluster.commands.cli import main
from cluster.commands.export import export_run
from cluster.config import load_config
from cluster.exits import ExitCode
from cluster.keeping.checkpoint import CheckpointStore
from cluster.keeping.rundir import RunDir
from contracts import ATTENTION_OUTPUT_SCALE
from learners.surgery import AttentionControls
from rollout.engines import CONTROLS_FILE

ROOT = Path(__file__).resolve().parents[1]


def _peft_model(tiny_model_path: str):
    """The tiny model with a LoRA adapter whose B matrices are random (a trained-looking one)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, torch_dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def run(tiny_model_path, tmp_path):
    """A finished run's directory: config, metrics with two evaluations, the final adapter."""
    run_dir = RunDir(tmp_path / "my-run")
    run_dir.write_config(load_config(ROOT / "configs" / "tiny.yaml", [f"model.path={tiny_model_path}", f"run.run_dir={run_dir.path}"]))
    run_dir.append_metrics({"step": 0, "eval/accuracy": 0.25, "eval/reward_mean": 0.3, "eval/n": 8})
    run_dir.append_metrics({"step": 3, "train/reward_mean": 0.5})
    run_dir.append_metrics({"step": 4, "eval/accuracy": 0.5, "eval/reward_mean": 0.55, "eval/n": 8})
    model = _peft_model(tiny_model_path)
    model.save_pretrained(run_dir.final_adapter)
    return run_dir, model


def _logits(model, tiny_model_path: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_path)("What is 3 + 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_adapter_export_loads_in_peft_with_the_same_outputs(run, tiny_model_path, tmp_path):
    from peft import AutoPeftModelForCausalLM

    run_dir, trained = run
    out = export_run(run_dir.path, tmp_path / "out")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    loaded = AutoPeftModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert torch.allclose(_logits(loaded, tiny_model_path), _logits(trained, tiny_model_path), atol=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(Path(tiny_model_path).resolve())
    assert not (tmp_path / ".out.partial").exists()

    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "| `eval/accuracy` | 0.250 | 0.500 |" in card and "Greedy decoding on 8 held-out problems" in card
    assert "advantage `grpo`" in card and "```yaml\nmodel:" in card


def test_merged_export_is_a_plain_model_with_the_same_outputs(run, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, trained = run
    assert main(["export", str(run_dir.path), "--merge", "--out", str(tmp_path / "merged")]) == ExitCode.OK
    out = tmp_path / "merged"
    assert list(out.glob("model*.safetensors")) and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert torch.allclose(_logits(merged, tiny_model_path), _logits(trained, tiny_model_path), atol=1e-4)
    assert "library_name: transformers" in (out / "README.md").read_text()


def test_attention_scales_are_folded_into_the_merged_model(run, tiny_model_path, tmp_path, capsys):
    """The surgeon's scales act on the base ``o_proj`` only (``W_o diag(s) + B A``): the merged
    export computes what the learner computed with its hooks; an adapter export refuses them."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    run_dir, trained = run
    config = trained.base_model.model.config
    scales = torch.linspace(0.6, 1.4, config.num_hidden_layers * config.num_attention_heads).reshape(config.num_hidden_layers, -1)
    save_file({ATTENTION_OUTPUT_SCALE: scales.contiguous()}, str(run_dir.final_adapter / CONTROLS_FILE))
    controls = AttentionControls(trained.base_model.model)
    controls.set(scales)
    expected = _logits(trained, tiny_model_path)
    assert not torch.allclose(expected, _logits(_peft_model(tiny_model_path), tiny_model_path), atol=1e-3)  # the scales matter

    assert main(["export", str(run_dir.path), "--out", str(tmp_path / "adapter")]) == ExitCode.USAGE
    assert "export with --merge" in capsys.readouterr().err
    export_run(run_dir.path, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    assert torch.allclose(_logits(merged, tiny_model_path), expected, atol=1e-4)
    assert "attention-output scales are folded" in (tmp_path / "merged" / "README.md").read_text()


def test_a_checkpoints_policy_and_wrong_requests(run, tmp_path, capsys):
    run_dir, _ = run
    CheckpointStore(run_dir.checkpoints).save(2, {"adapter": functools.partial(shutil.copytree, run_dir.final_adapter), "trainer.json": b"{}"})
    out = export_run(run_dir.path, tmp_path / "step2", checkpoint="2")
    assert "at step 2" in (out / "README.md").read_text()
    assert export_run(run_dir.path, tmp_path / "latest", checkpoint="latest").is_dir()

    assert main(["export", str(run_dir.path), "--checkpoint", "7", "--out", str(tmp_path / "x")]) == ExitCode.USAGE
    assert "no usable checkpoint '7'" in capsys.readouterr().err
    assert main(["export", str(run_dir.path), "--out", str(out)]) == ExitCode.USAGE  # not empty
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "y")]) == ExitCode.USAGE
    assert "is not a run directory" in capsys.readouterr().err


def test_push_to_hub_dry_run_lists_the_files_and_sends_nothing(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a real upload attempt would fail loudly here
    run_dir, _ = run
    argv = ["export", str(run_dir.path), "--out", str(tmp_path / "hub"), "--push-to-hub", "someone/my-policy", "--private", "--dry-run"]
    assert main(argv) == ExitCode.OK
    out = capsys.readouterr().out
    assert "would upload" in out and "to the Hub repo someone/my-policy (private)" in out
    assert "  adapter_model.safetensors" in out and "  README.md" in out
