"""Datasets behind the task interface: the user's own (the ``dataset`` task) and the benchmarks
GSM8K, SVAMP, MMLU, ARC-Challenge, AQuA, MathQA and a wiki text-continuation task.

Each is loaded by its Hugging Face dataset name (``datasets.load_dataset``, for real users) or
from a local JSONL or Parquet file, or a folder of per-split files. A benchmark reads its own
format (field names as on the Hub; ``fields`` remaps names for a copy that differs) and each
row becomes a ``Problem`` with the answer type its scorer needs: a number (numeric extraction
and math-verify), a letter (multiple choice), or free text (word overlap). The ``dataset``
task reads any rows: the prompt from ``prompt_field`` (through ``template``, which may name
other fields) or a chat from ``messages_field``, the reference answer from ``answer_field``,
and it is scored by the scorer it names or by the run's reward terms; its rows' fields travel
with each problem (``meta["example"]``) to the reward functions.

Bad rows never stop a run: bad JSON, non-UTF-8 bytes, a missing field, an answer that cannot
be parsed or an absurdly long row is skipped and counted, and one warning line per kind names
the file and the first row. A task left with no usable row is an error naming it, raised
before any model is loaded.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from contracts import Problem
from rollout.tasks.base import SPLITS, NoUsableRows, Split, TaskReward, check_split, endless, split_of

logger = logging.getLogger(__name__)

MAX_ROW_CHARS = 20_000
BAD_ROWS_KEPT = 5  # skipped rows named per kind of problem (raylight data check prints them)
LETTERS = "ABCDEFGHIJ"


class RowError(ValueError):
    """A row the task cannot use; the message is the kind of problem (counted per kind)."""


def _number(text: Any) -> str:
    """A numeric answer as a plain string ('1,234' -> '1234', 27.0 -> '27')."""
    value = str(text).strip().replace(",", "")
    try:
        number = float(value)
    except ValueError:
        raise RowError("answer is not a number") from None
    return str(int(number)) if number == int(number) else value


def _options_block(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}) {option}" for i, option in enumerate(options))


def _require(row: dict, *names: str) -> list:
    missing = [n for n in names if n not in row or row[n] is None]
    if missing:
        raise RowError(f"missing field {missing[0]!r}")
    return [row[n] for n in names]


# row -> (question, answer, meta); question is the problem text without the answer instruction


def gsm8k_row(row: dict) -> tuple[str, str, dict]:
    question, solution = _require(row, "question", "answer")
    if "####" not in solution:
        raise RowError("answer has no '#### <number>' line")
    return question, _number(solution.rsplit("####", 1)[1]), {}


def svamp_row(row: dict) -> tuple[str, str, dict]:
    body, question, answer = _require(row, "Body", "Question", "Answer")
    return f"{body.strip()} {question.strip()}", _number(answer), {}


def mmlu_row(row: dict) -> tuple[str, str, dict]:
    question, choices, answer = _require(row, "question", "choices", "answer")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise RowError("choices is not a list of options")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise RowError("answer is not an option index")
    return f"{question}\n\n{_options_block(choices)}", LETTERS[answer], {"subject": row.get("subject"), "letters": LETTERS[: len(choices)]}


def arc_challenge_row(row: dict) -> tuple[str, str, dict]:
    question, choices, key = _require(row, "question", "choices", "answerKey")
    try:
        texts, labels = list(choices["text"]), list(choices["label"])
    except (TypeError, KeyError):
        raise RowError("choices is not {text: [...], label: [...]}") from None
    if key not in labels or len(texts) != len(labels):
        raise RowError("answerKey is not one of the labels")
    return f"{question}\n\n{_options_block(texts)}", LETTERS[labels.index(key)], {"letters": LETTERS[: len(texts)]}


def aqua_row(row: dict) -> tuple[str, str, dict]:
    question, options, correct = _require(row, "question", "options", "correct")
    texts = [re.sub(r"^\s*[A-E]\s*\)\s*", "", o) for o in options] if isinstance(options, list) else []
    if not texts or str(correct).strip().upper() not in LETTERS[: len(texts)]:
        raise RowError("correct is not one of the options")
    return f"{question}\n\n{_options_block(texts)}", str(correct).strip().upper(), {"letters": LETTERS[: len(texts)]}


def mathqa_row(row: dict) -> tuple[str, str, dict]:
    problem, options, correct = _require(row, "Problem", "options", "correct")
    texts = [t.strip() for t in re.split(r"\s*,?\s*\b[a-e]\s*\)\s*", " " + str(options)) if t.strip()]
    if len(texts) < 2 or str(correct).strip().upper() not in LETTERS[: len(texts)]:
        raise RowError("options or correct cannot be parsed")
    return f"{problem}\n\n{_options_block(texts)}", str(correct).strip().upper(), {"letters": LETTERS[: len(texts)], "category": row.get("category")}


def wiki_row(row: dict, prompt_words: int = 48, answer_words: int = 24) -> tuple[str, str, dict]:
    (text,) = _require(row, "text")
    words = str(text).split()
    if len(words) < prompt_words + answer_words or str(text).lstrip().startswith("="):
        raise RowError("too short for a continuation (or a heading)")
    return " ".join(words[:prompt_words]), " ".join(words[prompt_words : prompt_words + answer_words]), {}


NUMERIC_INSTRUCTION = "Give the final answer as 'Answer: <number>'."
CHOICE_INSTRUCTION = "Answer with the letter of the correct option, as 'Answer: <letter>'."
WIKI_INSTRUCTION = "Continue this text from Wikipedia:\n\n"

GENERIC = "dataset"  # the task name of the user's own dataset
ROLES = ("system", "user", "assistant")
# what a scorer needs from a row besides the prompt; "reward" (terms alone) needs nothing
ANSWERED = ("numeric", "choice", "label", "overlap", "grid")


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError("messages is not a list of turns")
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise RowError("messages has a turn that is not {role: system|user|assistant, content: text}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


@dataclass(frozen=True)
class Fields:
    """Where the ``dataset`` task finds a row's parts."""

    prompt: str = "prompt"
    answer: str | None = None  # None: "answer", required only where the scorer needs one
    messages: str | None = None  # a chat (a list of {role, content}) instead of a prompt
    template: str = "{question}"  # the user turn: {question} is the prompt field, {<field>} any other
    scorer: str = "reward"
    labels: tuple[str, ...] = ("True", "False")  # the label scorer's

    def row(self, row: dict) -> tuple[str, str, dict]:
        meta: dict = {"example": row}
        reference = None
        if self.messages is not None:
            turns = _messages(_require(row, self.messages)[0])
            if turns[-1]["role"] == "assistant":  # a reference reply, not part of the prompt
                reference = turns.pop()["content"]
            if not turns or turns[-1]["role"] != "user":
                raise RowError("messages do not end with a user turn")
            question, meta["messages"] = turns[-1]["content"], turns
        else:
            (prompt,) = _require(row, self.prompt)
            try:
                question = self.template.format_map({**row, "question": prompt})
            except (KeyError, IndexError, ValueError) as exc:
                raise RowError(f"template names a field the row lacks: {exc}") from None
        needed = self.scorer in ANSWERED or self.answer is not None
        name = self.answer or "answer"
        if name in row and row[name] is not None:
            answer = str(row[name]).strip()
        elif reference is not None and self.answer is None:
            answer = reference.strip()
        elif needed:
            raise RowError(f"missing field {name!r}")
        else:
            answer = ""
        if needed and not answer:
            raise RowError(f"field {name!r} is empty")
        if self.scorer == "choice":
            answer = answer.upper()
            if len(answer) != 1 or answer not in LETTERS:
                raise RowError(f"answer is not an option letter {LETTERS[0]}-{LETTERS[-1]}")
        if self.scorer == "label" and answer not in self.labels:
            raise RowError(f"answer is not one of the labels {list(self.labels)}")
        if self.scorer in ("code", "humaneval"):
            entry_point, tests = _require(row, "entry_point", "tests")
            meta |= {"entry_point": entry_point, "tests": tests}
        return question, answer, meta


@dataclass(frozen=True)
class DatasetSpec:
    hf_path: str
    hf_config: str | None
    splits: dict[str, str]  # our split -> the dataset's split ("validation" carved from train if absent)
    row: Callable[[dict], tuple[str, str, dict]]
    reward: TaskReward
    template: str = "{question}\n\n" + NUMERIC_INSTRUCTION
    hf_revision: str | None = None  # e.g. the Hub's Parquet export of a dataset that still has a loading script


DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec("openai/gsm8k", "main", {"train": "train", "test": "test"}, gsm8k_row, TaskReward("numeric")),
    "svamp": DatasetSpec("ChilleD/SVAMP", None, {"train": "train", "test": "test"}, svamp_row, TaskReward("numeric")),
    "mmlu": DatasetSpec(
        "cais/mmlu", "all", {"train": "auxiliary_train", "validation": "validation", "test": "test"}, mmlu_row,
        TaskReward("choice"), "{question}\n\n" + CHOICE_INSTRUCTION,
    ),
    "arc_challenge": DatasetSpec(
        "allenai/ai2_arc", "ARC-Challenge", {"train": "train", "validation": "validation", "test": "test"}, arc_challenge_row,
        TaskReward("choice"), "{question}\n\n" + CHOICE_INSTRUCTION,
    ),
    "aqua": DatasetSpec(
        "deepmind/aqua_rat", "raw", {"train": "train", "validation": "validation", "test": "test"}, aqua_row,
        TaskReward("choice"), "{question}\n\n" + CHOICE_INSTRUCTION,
    ),
    "mathqa": DatasetSpec(
        "allenai/math_qa", None, {"train": "train", "validation": "validation", "test": "test"}, mathqa_row,
        TaskReward("choice"), "{question}\n\n" + CHOICE_INSTRUCTION,
        hf_revision="refs/convert/parquet",  # the repository's loading script no longer runs in datasets >= 4
    ),
    "wiki": DatasetSpec(
        "Salesforce/wikitext", "wikitext-103-raw-v1", {"train": "train", "validation": "validation", "test": "test"}, wiki_row,
        TaskReward("overlap"), WIKI_INSTRUCTION + "{question}",
    ),
}  # fmt: skip


def generic_spec(
    source: str, scorer: str, prompt_field: str | None, answer_field: str | None, messages_field: str | None,
    template: str | None, splits: dict[str, str] | None, subset: str | None, labels: list[str] | None,
) -> DatasetSpec:  # fmt: skip
    """The ``dataset`` task's spec: its rows read by ``Fields``, its splits as named (by default
    one ``train`` split, validation and test cut from it by a hash of each prompt)."""
    if labels is not None and len(set(labels)) < 2:
        raise ValueError(f"labels must name at least two labels, got {labels}")
    fields = Fields(prompt_field or "prompt", answer_field, messages_field, template or "{question}", scorer, tuple(labels or ("True", "False")))
    if messages_field is not None and (prompt_field or template):
        raise ValueError("the dataset task takes a chat (messages_field) or a prompt (prompt_field, template), not both")
    unknown = sorted(set(splits or {}) - set(SPLITS))
    if unknown or (splits is not None and "train" not in splits):
        raise ValueError(f"splits maps our splits {list(SPLITS)} to the dataset's and needs train; got {splits}")
    if splits is not None and len(set(splits.values())) != len(splits):
        raise ValueError(f"splits maps two of our splits to one of the dataset's, so they would share rows: {splits}")
    path = Path(source)
    if path.is_file() and (splits is not None or subset is not None):
        raise ValueError(f"{source} is one file, cut into the splits by a hash of each prompt: it takes no splits or subset")
    if splits is None and path.is_dir():  # a folder: the split files it has, by our names
        splits = {s: s for s in SPLITS if _split_file(path, s)} or {"train": "train"}
    options = {"labels": list(labels)} if labels else {}
    return DatasetSpec(source, subset, dict(splits or {"train": "train"}), fields.row, TaskReward(scorer, options), "{question}")


@dataclass
class LoadReport:
    """Usable and skipped rows of one split, skips counted by kind."""

    usable: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    bad_rows: dict[str, list[str]] = field(default_factory=dict)  # kind -> the first BAD_ROWS_KEPT "file:row"s


def _local_rows(path: Path) -> Iterator[tuple[str, dict | RowError]]:
    """(file:row, row or the reason it is unusable) from a JSONL or Parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:{i}", row
        return
    with open(path, "rb") as handle:
        for i, raw in enumerate(handle, start=1):
            where = f"{path}:{i}"
            if not raw.strip():
                continue
            if len(raw) > MAX_ROW_CHARS:
                yield where, RowError(f"row longer than {MAX_ROW_CHARS} bytes")
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield where, RowError("not UTF-8")
                continue
            except json.JSONDecodeError:
                yield where, RowError("bad JSON")
                continue
            yield where, row if isinstance(row, dict) else RowError("not a JSON object")


def _split_file(source: Path, name: str) -> Path | None:
    for suffix in (".jsonl", ".json", ".parquet"):
        candidate = source / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


class DatasetTask:
    """A benchmark dataset as a task; see the module docstring."""

    def __init__(
        self,
        dataset: str,
        id: str | None = None,
        source: str | None = None,
        fields: dict[str, str] | None = None,
        template: str | None = None,
        seed: int = 0,
        validation_percent: int = 10,
        test_percent: int = 10,
        eval_size: int = 100,
        max_rows: int | None = None,
        system_prompt: str | None = None,
        scorer: str | None = None,
        prompt_field: str | None = None,
        answer_field: str | None = None,
        messages_field: str | None = None,
        splits: dict[str, str] | None = None,
        subset: str | None = None,
        labels: list[str] | None = None,
    ):
        self.id = id or dataset
        generic = {"scorer": scorer, "prompt_field": prompt_field, "answer_field": answer_field, "messages_field": messages_field,
                   "splits": splits, "subset": subset, "labels": labels}  # fmt: skip
        if dataset == GENERIC:
            if not source:
                raise ValueError(f"{self.id}: the dataset task needs a source (a Hub name, a JSONL or Parquet file, or a folder)")
            self.spec = generic_spec(source, scorer or "reward", prompt_field, answer_field, messages_field, template, splits, subset, labels)
            template = None
        elif dataset in DATASETS:
            given = sorted(k for k, v in generic.items() if v is not None)
            if given:
                raise ValueError(f"{self.id}: {given} are settings of the 'dataset' task, not of the {dataset} benchmark")
            self.spec = DATASETS[dataset]
        else:
            raise ValueError(f"unknown dataset {dataset!r}; known: {[GENERIC, *sorted(DATASETS)]}")
        self.dataset = dataset
        self.source = source
        self.fields = fields or {}
        self.template = template or self.spec.template
        if "{question}" not in self.template:
            raise ValueError(f"{self.id}: the template must contain '{{question}}': {self.template!r}")
        self.seed = seed
        self.validation_percent, self.test_percent = validation_percent, test_percent
        self.eval_size = eval_size
        self.max_rows = max_rows
        self.system_prompt = system_prompt
        self.reward = self.spec.reward
        self.reports: dict[str, LoadReport] = {}
        self._cache: dict[str, list[Problem]] = {}

    # -- loading --------------------------------------------------------------------------

    def _plan(self, split: Split) -> tuple[Iterator[tuple[str, dict | RowError]], Callable[[str], bool]]:
        """Where ``split``'s rows come from, and which of them belong to it.

        A folder holds one file per split (named as the dataset names its splits, or as ours);
        a single file is cut into all three splits by a hash of each question; a validation or
        test split the dataset lacks is cut from its train split the same way."""
        source = Path(self.source) if self.source else None
        if source is not None and source.is_file():
            names: dict[str, str] = {}
        elif source is not None and self.source.endswith((".jsonl", ".json", ".parquet")):
            raise FileNotFoundError(f"{self.id}: data file {source} does not exist")
        else:
            names = dict(self.spec.splits)
        carved = {s: s not in names for s in ("validation", "test")}
        cut = lambda q: split_of(f"{self.id}:{q}", self.validation_percent * carved["validation"], self.test_percent * carved["test"])  # noqa: E731
        if split in names and split != "train":
            keep = lambda q: True  # noqa: E731
        else:
            keep = lambda q: cut(q) == split  # noqa: E731
        if source is not None and source.is_file():
            return _local_rows(source), keep
        name = names[split] if split in names else names["train"] if carved.get(split) else None
        if name is None:
            return iter(()), keep
        if source is not None and source.is_dir():
            file = _split_file(source, name) or _split_file(source, split if split in names else "train")
            return (_local_rows(file) if file else iter(())), keep
        if source is not None and not source.exists() and "/" not in self.source:
            raise FileNotFoundError(f"{self.id}: data folder {source} does not exist")
        return self._hub_rows(name), keep

    def _hub_rows(self, name: str) -> Iterator[tuple[str, dict | RowError]]:
        from datasets import load_dataset  # for real users; tests use local files

        path = self.source or self.spec.hf_path
        revision = None if self.source else self.spec.hf_revision
        rows = load_dataset(path, self.spec.hf_config, split=name, revision=revision)
        return ((f"{path}[{name}]:{i}", row) for i, row in enumerate(rows, start=1))

    def load(self, split: Split) -> list[Problem]:
        """Every usable problem of ``split``; bad rows skipped, counted and warned about."""
        split = check_split(split)
        if split in self._cache:
            return self._cache[split]
        rows, keep = self._plan(split)
        report = LoadReport()
        problems: list[Problem] = []
        for where, row in rows:
            if self.max_rows and report.usable >= self.max_rows:
                break
            try:
                if isinstance(row, RowError):
                    raise row
                for ours, theirs in self.fields.items():
                    if theirs in row:
                        row = {**row, ours: row[theirs]}
                question, answer, meta = self.spec.row(row)
                if len(question) + len(answer) > MAX_ROW_CHARS:
                    raise RowError(f"row longer than {MAX_ROW_CHARS} characters")
            except RowError as exc:
                kind = str(exc)
                report.skipped[kind] += 1
                kept = report.bad_rows.setdefault(kind, [])
                if len(kept) < BAD_ROWS_KEPT:
                    kept.append(where)
                continue
            if not keep(question):
                continue
            meta = {**meta, "row": where}
            uid = f"{self.id}:{split}:{len(problems)}"
            problems.append(Problem(uid, self.template.format(question=question), answer, split, meta, task=self.id))
            report.usable += 1
        for kind, count in report.skipped.items():
            logger.warning("%s/%s: skipped %d rows: %s (first at %s)", self.id, split, count, kind, report.bad_rows[kind][0])
        self.reports[split] = report
        self._cache[split] = problems
        return problems

    def problems(self, split: Split) -> Iterator[Problem]:
        """``train``: endless, reshuffled each pass (seeded). ``validation`` / ``test``: the first
        ``eval_size`` usable rows."""
        problems = self.load(split)
        if not problems:
            raise NoUsableRows(f"task {self.id}: no usable rows in its {split} split ({self.reports[split].skipped or 'empty'})")
        if split != "train":
            return iter(problems[: self.eval_size])
        return endless(problems, self.seed)


__all__ = ["DATASETS", "GENERIC", "SPLITS", "DatasetTask", "LoadReport", "NoUsableRows", "RowError"]
