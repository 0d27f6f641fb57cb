"""``raylight config``: the resolved config with every key's default and meaning.

Each settings class documents its own fields: the comment on a field's line, or the comment
lines just above it (``# ...``), is that key's meaning. ``key_docs`` walks the config tree
from ``Config`` and reads those comments from the classes' source, so the reference page
(``docs/config-reference.md``, written by ``reference_markdown``) and ``raylight config``
cannot drift from the code; a test fails if a field has no comment or the page is stale.

Lists of sections (``tasks``, ``phases``, ``reward.functions``) are shown with ``[]`` in the
key (``tasks[].difficulty``); mappings to sections (``monitor.rules``) with ``<name>``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key of the config: its dotted name, type, default and meaning."""

    key: str
    type: str
    default: Any
    doc: str
    section: str  # the settings class that holds it


# comments that are not a field's meaning: tool directives and "-- group --" headers
_NOT_DOCS = ("type:", "noqa", "fmt:", "--")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in ``cls``'s own source (the line's trailing comment, else the
    comment lines just above it), for the fields ``cls`` itself declares."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        text = token.string.lstrip("#").strip()
        if token.type == tokenize.COMMENT and not text.startswith(_NOT_DOCS):
            comments[token.start[0]] = text
    lines = source.splitlines()
    alone = {n for n in comments if lines[n - 1].lstrip().startswith("#")}  # comment lines, not trailing comments
    docs: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = next((comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in alone), None)
        above, row = [], node.lineno - 1
        while row in alone:
            above.insert(0, comments[row])
            row -= 1
        if trailing or above:
            docs[node.target.id] = trailing or " ".join(above)
    return docs


def _doc(cls: type, name: str) -> str:
    """The comment of field ``name``, from ``cls`` or the first base class that declares it."""
    for klass in cls.__mro__:
        if name in getattr(klass, "__dataclass_fields__", {}) and name in field_comments(klass):
            return field_comments(klass)[name]
    return ""


def _sections(hint: Any) -> tuple[type | None, str]:
    """The settings class inside a field's type (directly, optional, in a list or a dict) and
    the key's suffix for it: ``""``, ``"[]"`` or ``".<name>"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return hint, ""
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _sections(inner[0]) if len(inner) == 1 else (None, "")
    if origin in (list, tuple) and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1], ".<name>"
    return None, ""


def _type_name(hint: Any) -> str:
    text = str(hint) if not isinstance(hint, type) else hint.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def key_docs(cls: type | None = None, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key under ``cls`` (default: the whole ``Config``), in declaration order."""
    if cls is None:
        from cluster.config import Config

        cls = Config
    hints = typing.get_type_hints(cls)
    rows: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        section, suffix = _sections(hints[f.name])
        if section is not None:
            rows += key_docs(section, f"{key}{suffix}.")
            continue
        rows.append(KeyDoc(key, _type_name(hints[f.name]), _default(f), _doc(cls, f.name), cls.__name__))
    return rows


def section_docs(cls: type | None = None, prefix: str = "") -> dict[str, str]:
    """Dotted section key -> its meaning (the comment on the field that holds the section, else
    the section class's docstring's first paragraph)."""
    if cls is None:
        from cluster.config import Config

        cls = Config
    hints = typing.get_type_hints(cls)
    docs: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        section, suffix = _sections(hints[f.name])
        if section is None:
            continue
        key = f"{prefix}{f.name}{suffix}"
        docs[key] = _doc(cls, f.name) or _summary(section)
        if suffix:  # the list or mapping itself (``tasks``, ``monitor.rules``) has the field's meaning
            docs[f"{prefix}{f.name}"] = _doc(cls, f.name) or docs[key]
        docs |= section_docs(section, f"{key}.")
    return docs


def _summary(cls: type) -> str:
    """The first paragraph of ``cls``'s own docstring (not the signature dataclass writes)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return [dataclasses.asdict(v) for v in value]
    return list(value) if isinstance(value, tuple) else value


def _yaml_value(value: Any) -> str:
    """``value`` as YAML on one line (JSON, which YAML reads, where it holds a line break)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return json.dumps(value) if "\n" in text else text


def keys_text(config, only_changed: bool = False) -> str:
    """``key = value  # meaning`` per leaf of ``config`` (its lists' items numbered), with the
    default beside a changed value; ``only_changed``: just the keys that differ from the defaults."""
    from cluster.config import Config, dotted_items

    docs = section_docs() | {d.key: d.doc for d in key_docs()}
    defaults = dotted_items(Config())
    lines = []
    for key, value in dotted_items(config).items():
        changed = key not in defaults or defaults[key] != value
        if only_changed and not changed:
            continue
        note = "" if not changed else f" (default {_yaml_value(defaults[key])})" if key in defaults else " (not set by default)"
        doc = _key_doc(key, docs)
        meaning = f"  # {doc}" if doc else ""
        lines.append(f"{key} = {_yaml_value(value)}{note}{meaning}")
    return "\n".join(lines)


def _general_key(key: str) -> str:
    """``tasks.0.difficulty`` -> ``tasks[].difficulty``; ``monitor.rules.kl.action`` ->
    ``monitor.rules.<name>.action``: the key as ``key_docs`` names it."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] += "[]"
        elif ".".join(out) in _mapped_sections():
            out.append("<name>")
        else:
            out.append(part)
    return ".".join(out)


@functools.cache
def _mapped_sections() -> frozenset[str]:
    """The keys that map names to sections (``monitor.rules``)."""
    return frozenset(d.key.split(".<name>.")[0] for d in key_docs() if ".<name>." in d.key)


def _key_doc(key: str, docs: dict[str, str]) -> str:
    """The meaning of ``key``, or of the longest documented key it lies under (a value inside a
    mapping such as ``tasks.0.weights.correct`` has its mapping's meaning)."""
    parts = _general_key(key).split(".")
    for end in range(len(parts), 0, -1):
        for name in (".".join(parts[:end]), ".".join(parts[:end]) + "[]"):  # an empty list of sections: its section's meaning
            if name in docs:
                return docs[name]
    return ""


def yaml_text(config) -> str:
    """The resolved config as YAML, each section and leaf with its meaning as a comment."""
    from cluster.config import config_to_dict

    docs = section_docs() | {d.key: d.doc for d in key_docs()}
    return "\n".join(_yaml_lines(config_to_dict(config), "", 0, docs)) + "\n"


def _yaml_lines(tree: dict, prefix: str, depth: int, docs: dict[str, str]) -> list[str]:
    lines, pad = [], "  " * depth
    for key, value in tree.items():
        doc = _key_doc(f"{prefix}{key}", docs) if not isinstance(value, dict) else docs.get(_general_key(f"{prefix}{key}"), "")
        if isinstance(value, dict) and value:
            if doc:
                lines.append(f"{pad}# {doc}")
            lines.append(f"{pad}{key}:")
            lines += _yaml_lines(value, f"{prefix}{key}.", depth + 1, docs)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            if doc:
                lines.append(f"{pad}# {doc}")
            lines.append(f"{pad}{key}:")
            for i, item in enumerate(value):
                body = _yaml_lines(item, f"{prefix}{key}.{i}.", depth + 2, docs)
                lines += [f"{pad}  - {body[0].lstrip()}" if not body[0].lstrip().startswith("#") else body[0], *body[1:]]
        else:
            comment = f"  # {doc}" if doc else ""
            lines.append(f"{pad}{key}: {_yaml_value(value)}{comment}")
    return lines


def reference_markdown() -> str:
    """``docs/config-reference.md``: one table per section of every key, its type, default and
    meaning. Regenerate with ``raylight config --reference > docs/config-reference.md``."""
    sections = section_docs()
    out = [
        "# Configuration reference",
        "",
        "Every key of a run's config, generated from the settings classes' own comments by",
        "`raylight config --reference` (a test keeps this page in sync). Set a key in a config",
        "file or on the command line as `dotted.key=value`; see [Configuration](configuration.md).",
        "`tasks[]` is a list of tasks, `monitor.rules.<name>` a rule by name.",
        "",
    ]
    groups: dict[str, list[KeyDoc]] = {}
    for doc in key_docs():
        head = doc.key.rsplit(".", 1)[0] if "." in doc.key else ""
        groups.setdefault(head, []).append(doc)
    for head, rows in groups.items():
        out += [f"## `{head}`" if head else "## Top level", ""]
        if sections.get(head):
            out += [sections[head], ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for row in rows:
            meaning = row.doc.replace("|", "\\|")
            kind = row.type.replace("|", "\\|")
            default = _yaml_value(row.default).replace("|", "\\|")
            out.append(f"| `{row.key}` | `{kind}` | `{default}` | {meaning} |")
        out.append("")
    return "\n".join(out)


def main(config_path: str | None, overrides: list[str], mode: str) -> str:
    """What ``raylight config`` prints: ``yaml`` (default), ``keys``, ``diff`` or ``reference``."""
    if mode == "reference":
        return reference_markdown()
    from cluster.config import load_config

    config = load_config(config_path, overrides)
    if mode == "keys":
        return keys_text(config)
    if mode == "diff":
        return keys_text(config, only_changed=True) or "(the config is the defaults)"
    return yaml_text(config)
