"""The ``dataset`` task: the user's own rows (JSONL, Parquet, a folder of split files, a Hub
name) with field names the project has never seen, a template naming other fields, chat rows
through the tokenizer's chat template, rows lacking a field skipped and named by file and row
(``raylight data check``), and the config errors a user meets first."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.commands.cli import main
from cluster.config import ConfigError, load_config
from rollout.prompts import render_prompts
from rollout.tasks import NoUsableRows, build_task


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def everything(task):
    return {split: task.load(split) for split in ("train", "validation", "test")}


def test_own_fields_a_template_of_them_and_rows_lacking_a_field(tmp_path):
    rows = [{"riddle": f"What has {i} legs?", "hint": "an animal", "solution": str(i), "id": i} for i in range(60)]
    rows[5] = {"riddle": "no solution here", "hint": "x"}
    rows[9] = {"solution": "3", "hint": "x"}
    rows[11] = {"riddle": "no hint", "solution": "1"}
    data = write_jsonl(tmp_path / "riddles.jsonl", rows)
    task = build_task("dataset", id="riddles", source=str(data), prompt_field="riddle", answer_field="solution",
                      template="{question} (Hint: {hint}.) Answer as 'Answer: <number>'.", scorer="numeric")  # fmt: skip
    splits = everything(task)
    assert sum(map(len, splits.values())) == 57 and all(splits.values())
    assert len({p.uid for s in splits.values() for p in s}) == len({p.question for s in splits.values() for p in s}) == 57
    problem = splits["train"][0]
    assert problem.question.startswith("What has") and "(Hint: an animal.)" in problem.question and problem.task == "riddles"
    assert problem.meta["example"]["riddle"] in problem.question and problem.answer == str(problem.meta["example"]["id"])
    assert task.reward.scorer == "numeric"
    skipped = {k: v for split in splits for k, v in task.reports[split].skipped.items()}
    assert skipped == {"missing field 'solution'": 1, "missing field 'riddle'": 1, "template names a field the row lacks: 'hint'": 1}
    bad = task.reports["train"].bad_rows
    assert bad["missing field 'solution'"] == [f"{data}:6"] and bad["missing field 'riddle'"] == [f"{data}:10"]


def test_terms_alone_need_no_answer_but_a_named_answer_field_is_required(tmp_path):
    data = write_jsonl(tmp_path / "open.jsonl", [{"prompt": f"Write a haiku about {i}."} for i in range(30)] + [{"text": "no prompt"}])
    task = build_task("dataset", source=str(data))
    problems = task.load("train")
    assert problems and all(p.answer == "" for p in problems) and task.reward.scorer == "reward"
    assert task.reports["train"].skipped == {"missing field 'prompt'": 1}
    strict = build_task("dataset", source=str(data), answer_field="reference")
    with pytest.raises(NoUsableRows, match="no usable rows in its train split"):
        next(strict.problems("train"))


def test_chat_rows_go_through_the_chat_template(tmp_path, tiny_model_path):
    from transformers import AutoTokenizer

    rows = [{"conversation": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": f"Say hello {i} times."},
                              {"role": "assistant", "content": f"hello x{i}"}]} for i in range(20)]  # fmt: skip
    rows += [{"conversation": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "?"}]}, {"conversation": "just text"}]
    task = build_task("dataset", source=str(write_jsonl(tmp_path / "chat.jsonl", rows)), messages_field="conversation", system_prompt="Be brief.")
    problems = [p for split in everything(task).values() for p in split]
    assert len(problems) == 20 and problems[0].answer.startswith("hello x")  # the final assistant turn is the reference
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert tokenizer.chat_template
    (prompt,) = render_prompts(tokenizer, problems[:1], task.system_prompt)
    expected = tokenizer.apply_chat_template(problems[0].meta["messages"], tokenize=False, add_generation_prompt=True)
    assert prompt.text == expected and "You are a pirate." in prompt.text and "Be brief." not in prompt.text
    assert "hello x" not in prompt.text  # the reference never reaches the generator
    skipped = task.reports["train"].skipped
    assert skipped == {"messages has a turn that is not {role: system|user|assistant, content: text}": 1, "messages is not a list of turns": 1}


def test_parquet_a_folder_of_splits_and_a_hub_name(tmp_path, monkeypatch):
    rows = [{"q": f"{i} + 1 = ?", "a": i + 1} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sums.parquet")
    task = build_task("dataset", source=str(tmp_path / "sums.parquet"), prompt_field="q", answer_field="a", scorer="numeric")
    assert sum(len(s) for s in everything(task).values()) == 40 and task.load("train")[0].answer.isdigit()

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "training.jsonl", rows[:30])
    write_jsonl(folder / "heldout.jsonl", rows[30:])
    split_task = build_task("dataset", source=str(folder), prompt_field="q", answer_field="a", scorer="numeric",
                            splits={"train": "training", "test": "heldout"})  # fmt: skip
    splits = everything(split_task)
    assert len(splits["test"]) == 10 and len(splits["train"]) + len(splits["validation"]) == 30 and splits["validation"]

    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None):  # nothing downloads here
        calls.append((path, name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = build_task("dataset", source="someone/sums", subset="easy", prompt_field="q", answer_field="a", scorer="numeric")
    assert len(hub.load("validation")) + len(hub.load("train")) + len(hub.load("test")) == 40
    assert set(calls) == {("someone/sums", "easy", "train")}


def test_answers_the_scorer_cannot_use_are_skipped_not_scored_zero(tmp_path):
    rows = [{"prompt": f"Pick {i}", "answer": "B"} for i in range(20)] + [{"prompt": "p1", "answer": "Paris"}, {"prompt": "p2", "answer": ""}]
    choice = build_task("dataset", source=str(write_jsonl(tmp_path / "c.jsonl", rows)), scorer="choice")
    everything(choice)
    skipped = {k: v for split in ("train", "validation", "test") for k, v in choice.reports[split].skipped.items()}
    assert skipped == {"answer is not an option letter A-J": 1, "field 'answer' is empty": 1}
    labels = [{"prompt": f"Is {i} even?", "answer": ["yes", "no"][i % 2]} for i in range(20)] + [{"prompt": "q", "answer": "maybe"}]
    label = build_task("dataset", source=str(write_jsonl(tmp_path / "l.jsonl", labels)), scorer="label", labels=["yes", "no"])
    everything(label)
    assert {k for split in ("train", "validation", "test") for k in label.reports[split].skipped} == {"answer is not one of the labels ['yes', 'no']"}
    assert label.reward.options == {"labels": ["yes", "no"]}


def test_a_folder_with_split_files_by_our_names_uses_them(tmp_path):
    rows = [{"prompt": f"{i} + 1 = ?", "answer": str(i + 1)} for i in range(30)]
    write_jsonl(tmp_path / "train.jsonl", rows[:20])
    write_jsonl(tmp_path / "validation.jsonl", rows[20:25])
    write_jsonl(tmp_path / "test.jsonl", rows[25:])
    splits = everything(build_task("dataset", source=str(tmp_path), scorer="numeric"))
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [20, 5, 5]


def test_settings_are_checked_with_errors_naming_them(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "1"}])
    with pytest.raises(ValueError, match="needs a source"):
        build_task("dataset")
    with pytest.raises(ValueError, match=r"\['prompt_field'\] are settings of the 'dataset' task, not of the gsm8k benchmark"):
        build_task("gsm8k", prompt_field="q")
    with pytest.raises(ValueError, match="a chat .* or a prompt"):
        build_task("dataset", source=str(data), messages_field="m", prompt_field="p")
    with pytest.raises(ValueError, match="needs train"):
        build_task("dataset", source=str(data), splits={"test": "t"})
    with pytest.raises(ValueError, match="would share rows"):
        build_task("dataset", source="someone/data", splits={"train": "train", "test": "train"})
    with pytest.raises(ValueError, match="is one file, cut into the splits .* it takes no splits or subset"):
        build_task("dataset", source=str(data), splits={"train": "train"})
    with pytest.raises(ValueError, match="at least two labels"):
        build_task("dataset", source=str(data), scorer="label", labels=["yes"])
    with pytest.raises(ConfigError, match=r"scored by reward terms alone \(scorer: reward\), and none is configured"):
        load_config(None, [f"tasks=[{{name: dataset, source: {data}}}]"])
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(dataset\).scorer: 'numerc' is not one of"):
        load_config(None, [f"tasks=[{{name: dataset, source: {data}, scorer: numerc}}]"])
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].path: reward function 'nowhere_pkg.m:f': cannot import"):
        load_config(None, [f"tasks=[{{name: dataset, source: {data}}}]", "reward.functions=[{path: 'nowhere_pkg.m:f'}]"])
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(dataset\).rewards names \['typo'\]"):
        load_config(None, [f"tasks=[{{name: dataset, source: {data}, rewards: [typo]}}]", "reward.http={url: 'http://127.0.0.1:9/x'}"])
    with pytest.raises(ConfigError, match="unknown config key 'reward.http.adress'"):
        load_config(None, ["reward.http={adress: 'http://x'}"])
    with pytest.raises(ConfigError, match="weight must be a finite number"):
        load_config(None, ["reward.http={url: 'http://127.0.0.1:9/x', weight: .nan}"])
    with pytest.raises(ConfigError, match=r"reward.http: 3 tries of up to 30s do not fit the verifier's deadline of verifier.timeout_s=60s"):
        load_config(None, ["reward.http={url: 'http://127.0.0.1:9/x', timeout_s: 30}"])
    with pytest.raises(ConfigError, match=r"reward terms \['correct'\] have the names of components its numeric scorer reports"):
        load_config(None, ["reward.http={url: 'http://127.0.0.1:9/x', name: correct}"])


def test_data_check_names_the_skipped_rows(tmp_path, capsys):
    rows = [{"prompt": f"Count to {i}.", "target": str(i)} for i in range(40)]
    rows[2], rows[30] = {"prompt": "no target"}, {"target": "7"}
    data = write_jsonl(tmp_path / "mine.jsonl", rows)
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{path: tiny}}\ntasks:\n  - name: dataset\n    source: {data}\n    answer_field: target\n    scorer: numeric\n")
    assert main(["data", "check", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"skipped 1 x missing field 'target': {data}:3" in out and f"skipped 1 x missing field 'prompt': {data}:31" in out
    summary = json.loads(out.strip().splitlines()[-1])
    train = next(s for s in summary["splits"] if s["split"] == "train")
    assert train["bad_rows"] == {"missing field 'target'": [f"{data}:3"], "missing field 'prompt'": [f"{data}:31"]}
