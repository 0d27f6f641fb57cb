"""The GPU recipes as shipped (configs/gpu/): each passes `raylight plan` for the hardware its
header states, and `raylight data check`. Only their plans and data are checked here: no GPU."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from cluster.commands.cli import main
from cluster.config import load_config
from helpers import ROOT

RECIPES = sorted((ROOT / "configs" / "gpu").glob("*.yaml"))


def stated_plan(recipe: Path) -> list[str]:
    """The `raylight plan ...` command the recipe's header gives, as arguments."""
    lines = [line.lstrip("# ").strip() for line in recipe.read_text().splitlines() if line.lstrip("# ").startswith("raylight plan ")]
    assert len(lines) == 1, f"{recipe.name} must state its hardware in one `raylight plan` line"
    return shlex.split(lines[0])[1:]


def test_there_are_recipes_for_one_gpu_one_node_and_two_nodes():
    hardware = {tuple(stated_plan(r)[2:]) for r in RECIPES}
    assert ("--gpus-per-node", "1", "--gpu-memory", "80GiB") in hardware
    assert ("--gpus-per-node", "8", "--gpu-memory", "80GiB") in hardware
    assert ("--gpus-per-node", "8", "--gpu-memory", "80GiB", "--nodes", "2") in hardware
    assert all("/" in load_config(r, []).model.path for r in RECIPES)  # models by Hugging Face name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_a_gpu_recipe_fits_its_stated_hardware(recipe, capsys):
    args = stated_plan(recipe)
    assert args[1] == f"configs/gpu/{recipe.name}"
    assert main(args) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.rstrip().endswith("fits")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_a_gpu_recipes_data_loads(recipe, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no Hub here: lengths in words, not tokens
    assert main(["data", "check", str(recipe)]) == 0
    assert '"unusable": []' in capsys.readouterr().out
