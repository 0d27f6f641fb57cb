"""Every listed dataset loads from fixture files in its real format (written here; nothing is
downloaded), gets the right answer type and scorer, and skips bad rows with a count."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewards.scoring import ScorerSpec, build_scorer
from rollout.tasks import NoUsableRows, build_task


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def score(task, problem, completion):
    return build_scorer(ScorerSpec(scorer=task.reward.scorer, options=dict(task.reward.options)))(completion, problem)


def all_problems(task):
    return [p for split in ("train", "validation", "test") for p in task.load(split)]


def test_gsm8k_jsonl_with_bad_rows(tmp_path):
    rows = [{"question": f"Ann has {i} apples and buys 1,000 more. How many?", "answer": f"{i} + 1000 = {i + 1000}\n#### {i + 1000:,}"} for i in range(40)]
    rows += ["{broken", {"question": "missing the answer"}, {"question": "q", "answer": "no marker"}, {"question": "q", "answer": "#### seven"}]
    task = build_task("gsm8k", source=str(write_jsonl(tmp_path / "gsm8k.jsonl", rows)))
    problems = all_problems(task)
    assert len(problems) == 40 and len({p.uid for p in problems}) == 40
    assert {p.answer for p in problems} == {str(i + 1000) for i in range(40)}  # "1,005" -> "1005"
    assert task.reports["train"].skipped == {"bad JSON": 1, "missing field 'answer'": 1, "answer has no '#### <number>' line": 1, "answer is not a number": 1}
    problem = problems[0]
    assert "Answer: <number>" in problem.question and task.reward.scorer == "numeric"
    assert score(task, problem, f"so #### {problem.answer}").correct


def test_field_mapping_for_a_renamed_copy(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "solution": f"#### {i + 1}"} for i in range(30)]
    task = build_task("gsm8k", source=str(write_jsonl(tmp_path / "copy.jsonl", rows)), fields={"question": "prompt", "answer": "solution"})
    assert len(all_problems(task)) == 30


def test_svamp_parquet(tmp_path):
    rows = [{"ID": f"chal-{i}", "Body": f"Jack had {i + 10} marbles. He gave away 4.", "Question": "How many marbles does he have now?",
             "Equation": f"( {i + 10}.0 - 4.0 )", "Answer": float(i + 6), "Type": "Subtraction"} for i in range(30)]  # fmt: skip
    task = build_task("svamp", source=str(write_parquet(tmp_path / "svamp.parquet", rows)))
    problems = all_problems(task)
    assert len(problems) == 30 and {p.answer for p in problems} == {str(i + 6) for i in range(30)}  # 27.0 -> "27"
    assert "Jack had" in problems[0].question and "How many marbles" in problems[0].question


def test_mmlu_parquet_folder_with_its_split_names(tmp_path):
    def rows(n, offset):
        return [{"question": f"Which number is {i}?", "subject": "math", "choices": [str(i - 1), str(i), str(i + 1), str(i + 2)], "answer": 1} for i in range(offset, offset + n)]

    folder = tmp_path / "mmlu"
    folder.mkdir()
    write_parquet(folder / "auxiliary_train.parquet", rows(20, 0))
    write_parquet(folder / "validation.parquet", rows(5, 100))
    write_parquet(folder / "test.parquet", rows(7, 200) + [{"question": "bad", "subject": "x", "choices": ["a", "b"], "answer": 5}])
    task = build_task("mmlu", source=str(folder))
    assert [len(task.load(s)) for s in ("train", "validation", "test")] == [20, 5, 7]
    assert task.reports["test"].skipped == {"answer is not an option index": 1}
    problem = task.load("test")[0]
    assert problem.answer == "B" and problem.meta["letters"] == "ABCD" and "D) 202" in problem.question
    assert score(task, problem, "The answer is (B).").correct
    assert not score(task, problem, "Answer: E").correct  # not an option here


def test_arc_challenge_jsonl_with_numeric_labels(tmp_path):
    folder = tmp_path / "arc"
    folder.mkdir()
    rows = [{"id": f"Mercury_{i}", "question": f"Which gas is number {i}?", "choices": {"text": ["oxygen", "helium", "neon", "argon"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"} for i in range(10)]
    rows.append({"id": "x", "question": "Numbered labels?", "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}, "answerKey": "2"})
    rows.append({"id": "y", "question": "Broken key", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "Z"})
    for split in ("train", "validation", "test"):
        write_jsonl(folder / f"{split}.jsonl", rows)
    task = build_task("arc_challenge", source=str(folder))
    problems = task.load("test")
    assert len(problems) == 11 and task.reports["test"].skipped == {"answerKey is not one of the labels": 1}
    assert problems[0].answer == "C" and problems[-1].answer == "B" and problems[-1].meta["letters"] == "ABC"


def test_aqua_and_mathqa_option_formats(tmp_path):
    aqua = [{"question": f"A train covers {i}0 km in 1 hour. Speed?", "options": [f"A){i}0 km/h", "B)5 km/h", "C)1 km/h", "D)2 km/h", "E)3 km/h"], "rationale": "...", "correct": "A"} for i in range(1, 21)]
    task = build_task("aqua", source=str(write_jsonl(tmp_path / "aqua.jsonl", aqua)))
    problem = all_problems(task)[0]
    assert problem.answer == "A" and "A) 10 km/h" in problem.question and "E) 3 km/h" in problem.question
    mathqa = [{"Problem": f"what is {i} % of 200 ?", "Rationale": "...", "options": f"a ) {2 * i} , b ) 27.675 , c ) 30 , d ) 35 , e ) 28", "correct": "a",
               "annotated_formula": "", "linear_formula": "", "category": "gain"} for i in range(1, 21)]  # fmt: skip
    task = build_task("mathqa", source=str(write_jsonl(tmp_path / "mathqa.json", mathqa)))
    problem = all_problems(task)[0]
    assert problem.answer == "A" and "B) 27.675" in problem.question and problem.meta["letters"] == "ABCDE"
    assert score(task, problem, "Answer: A").correct


def test_wiki_continuation_parquet(tmp_path):
    paragraph = " ".join(f"word{i}" for i in range(100))
    rows = [{"text": " = Heading = \n"}, {"text": ""}, {"text": "too short\n"}] + [{"text": f"{paragraph} {j}\n"} for j in range(20)]
    task = build_task("wiki", source=str(write_parquet(tmp_path / "wikitext.parquet", rows)))
    problems = all_problems(task)
    assert len(problems) == 20 and sum(task.reports["train"].skipped.values()) == 3
    problem = problems[0]
    assert problem.question.startswith("Continue this text") and problem.answer.split()[0] == "word48"
    assert score(task, problem, problem.answer).components["f1"] == 1.0
    assert score(task, problem, "nothing alike at all").components["f1"] == 0.0


def test_a_task_with_no_usable_rows_is_a_named_error(tmp_path):
    task = build_task("gsm8k", source=str(write_jsonl(tmp_path / "bad.jsonl", ["{", {"question": "q"}])))
    with pytest.raises(NoUsableRows, match="task gsm8k: no usable rows in its train split"):
        next(task.problems("train"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        build_task("gsm8k", source=str(tmp_path / "missing.jsonl")).load("train")


def test_overlong_rows_are_skipped(tmp_path):
    rows = [{"question": "x" * 30_000, "answer": "#### 1"}] + [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(20)]
    task = build_task("gsm8k", source=str(write_jsonl(tmp_path / "long.jsonl", rows)))
    all_problems(task)
    assert any("longer than" in kind for kind in task.reports["train"].skipped)


def test_training_stops_on_unusable_data_before_loading_a_model(tmp_path, capsys):
    """The model path does not exist: the error must be about the data, found first."""
    from cluster.commands.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", ["{", {"question": "q"}])
    argv = ["train", "configs/tiny.yaml", "model.path=/nowhere/model", f"tasks=[{{name: gsm8k, source: {bad}}}]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "task gsm8k: no usable rows in its train split" in err and "/nowhere/model" not in err


def test_hub_names_configs_and_splits(monkeypatch):
    """Nothing can be downloaded here: ``datasets.load_dataset`` is replaced by a stand-in that
    records what it was asked for and returns rows in the dataset's format."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        if path == "openai/gsm8k":
            return [{"question": f"q{i}?", "answer": f"#### {i}"} for i in range(30)]
        return [{"Problem": f"p{i}", "options": "a ) 1 , b ) 2", "correct": "b", "Rationale": ""} for i in range(5)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    gsm8k = build_task("gsm8k")
    assert len(gsm8k.load("test")) == 30 and gsm8k.load("test")[0].meta["row"] == "openai/gsm8k[test]:1"
    gsm8k.load("validation")  # GSM8K has no validation split: cut from train
    assert calls[:2] == [("openai/gsm8k", "main", "test", None), ("openai/gsm8k", "main", "train", None)]
    assert build_task("mathqa").load("test")[0].answer == "B"
    assert calls[-1] == ("allenai/math_qa", None, "test", "refs/convert/parquet")
