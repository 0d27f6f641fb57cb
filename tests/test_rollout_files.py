"""The run directory's rollout files: a mixture's rollouts filtered by task and by a reward
component with pyarrow and pandas, and a file of the earlier schema read as the current one."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.keeping.rundir import RunDir, rollout_schema
from contracts import Completion, PolicyRef, Problem, Prompt, Sample, Verdict


def sample(task: str, difficulty: int | None, logprobs: tuple[float, ...] = (-0.5, -1.25)) -> Sample:
    problem = Problem(f"{task}:0", "q", "4", task=task, difficulty=difficulty)
    completion = Completion(tuple(range(len(logprobs))), "4", logprobs, "stop")
    return Sample(Prompt(problem, "Q: q", (1, 2)), completion, PolicyRef(version=3), group_index=0)


def mixture_step(run_dir: RunDir) -> None:
    """Two gsm8k samples (no difficulty) and two infix samples at difficulty 3; one verdict has
    no components (a verifier failure)."""
    samples = [sample("gsm8k", None), sample("gsm8k", None), sample("infix", 3), sample("infix", 3, logprobs=(-0.1,))]
    verdicts = [
        Verdict(1.1, True, {"correct": 1.0, "format": 0.1}),
        Verdict(0.0, False, {"correct": 0.0, "format": 0.0}),
        Verdict(1.0, True, {"correct": 1.0, "anchor": 0.5}),
        Verdict.infra_error("sandbox died"),
    ]
    run_dir.write_rollouts(1, samples, verdicts, [0.5, -0.5, 1.0, None])


def test_a_mixture_step_filters_by_task_and_component(tmp_path):
    run_dir = RunDir(tmp_path)
    mixture_step(run_dir)
    table = pq.read_table(run_dir.rollouts_path(1))
    assert table.schema.field("generator_logprobs").type == pa.list_(pa.float32())
    assert table.schema.field("reward_components").type == pa.struct([(n, pa.float64()) for n in ("correct", "format", "anchor")])
    assert table["task"].to_pylist() == ["gsm8k", "gsm8k", "infix", "infix"]
    assert table["difficulty"].to_pylist() == [None, None, 3, 3]
    assert table["reward_components"].to_pylist()[2] == {"correct": 1.0, "format": None, "anchor": 0.5}
    assert table["reward_components"].to_pylist()[3] == {"correct": None, "format": None, "anchor": None}
    assert table["generator_logprobs"].to_pylist()[0] == [-0.5, -1.25]  # exact in float32

    df = pd.read_parquet(run_dir.rollouts_path(1), dtype_backend="pyarrow")
    gsm8k = df[df.task == "gsm8k"]
    assert len(gsm8k) == 2 and gsm8k.difficulty.isna().all()
    assert df[df.task == "infix"].difficulty.tolist() == [3, 3]
    correct = df[df.reward_components.struct.field("correct") == 1.0]
    assert correct.task.tolist() == ["gsm8k", "infix"]
    assert df.reward_components.struct.field("format").tolist()[:2] == [0.1, 0.0]
    assert df.generator_logprobs.dtype.pyarrow_dtype == pa.list_(pa.float32())
    assert run_dir.read_rollouts(1).equals(table)


def test_later_steps_keep_the_runs_fields_and_the_folder_reads_as_one_table(tmp_path):
    """A step without components keeps the fields of the steps before it (all null), a step
    with a new component adds its field: pyarrow's dataset reader and DuckDB take the folder;
    ``rollouts_table`` joins every step. Before any component, the column is null."""
    run_dir = RunDir(tmp_path)
    run_dir.write_rollouts(1, [sample("infix", 1)], [Verdict(0.3, False)], [0.0])
    assert pq.read_table(run_dir.rollouts_path(1)).schema.field("reward_components").type == pa.null()
    mixture_step(run_dir)  # step 1 again, now with components
    run_dir.write_rollouts(2, [sample("infix", 1)], [Verdict(0.3, False)], [0.0])
    run_dir.write_rollouts(3, [sample("infix", 2)], [Verdict(0.5, False, {"judge/brief": 0.5})], [0.1])
    fields = ["correct", "format", "anchor"]
    assert pq.read_table(run_dir.rollouts_path(2)).schema.field("reward_components").type.names == fields
    assert pq.read_table(run_dir.rollouts_path(3)).schema.field("reward_components").type.names == [*fields, "judge/brief"]
    assert run_dir.read_rollouts(2)["reward_components"].to_pylist() == [dict.fromkeys(fields)]

    every = run_dir.rollouts_table()
    assert every["step"].to_pylist() == [1, 1, 1, 1, 2, 3]
    assert every["reward_components"].type.names == [*fields, "judge/brief"]
    assert every["reward_components"].to_pylist()[-1] == {**dict.fromkeys(fields), "judge/brief": 0.5}
    df = every.to_pandas(types_mapper=pd.ArrowDtype)
    assert df[df.task == "infix"].difficulty.tolist() == [3, 3, 1, 2]
    with pytest.raises(FileNotFoundError, match="holds no rollout files"):
        RunDir(tmp_path / "empty").rollouts_table()


def test_a_file_of_the_earlier_schema_reads_as_the_current_one(tmp_path):
    """The writer before task, difficulty and the struct: inferred types, components as JSON."""
    run_dir = RunDir(tmp_path)
    old = {
        "step": [5, 5], "prompt_uid": ["a", "b"], "prompt": ["Q: a", "Q: b"], "answer": ["1", "2"], "completion": ["1", "3"],
        "prompt_token_ids": [[1, 2], [1, 3]], "completion_token_ids": [[7], []], "generator_logprobs": [[-0.1], []],
        "finish_reason": ["stop", "bank"], "policy_version": [2, 2], "group_index": [0, 1], "replayed": [False, True],
        "reward": [1.0, 0.0], "correct": [True, False], "verdict": ["correct", "wrong"], "status": ["ok", "ok"],
        "error": [None, None], "extracted": ["1", "3"], "reward_components": [json.dumps({"correct": 1.0}), json.dumps({"correct": 0.0, "format": 0.2})],
        "reward_faults": [[], []], "advantage": [0.5, None],
    }  # fmt: skip
    pq.write_table(pa.table(old), run_dir.rollouts_path(5))
    table = run_dir.read_rollouts(5)
    assert table.schema.field("generator_logprobs").type == pa.list_(pa.float32())
    assert table["generator_logprobs"].to_pylist() == [[pytest.approx(-0.1)], []]
    assert table["task"].to_pylist() == [None, None] and table["difficulty"].to_pylist() == [None, None]
    assert table["reward_components"].to_pylist() == [{"correct": 1.0, "format": None}, {"correct": 0.0, "format": 0.2}]
    assert table["error"].type == pa.string() and table["advantage"].to_pylist() == [0.5, None]
    assert table.schema.names == rollout_schema(pa.null()).names
