"""Real text and code found on any machine with Python: the standard library's sources and docs.

Everything is returned in a fixed (sorted) order, so a seed picks the same material on every run
of the same Python version (the version is recorded in eval reports: other versions differ).
"""

from __future__ import annotations

import ast
import collections
import functools
import keyword
import pydoc_data.topics
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Packages whose files are tests, demos, vendored or generated code rather than library source.
_SKIP_PARTS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "ensurepip",
    "__phello__",
    "__pycache__",
}


@dataclass(frozen=True)
class FunctionDoc:
    """A public module-level stdlib function with its docstring."""

    module: str
    name: str
    doc: str


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def source_files() -> tuple[Path, ...]:
    """The standard library's own .py files (no tests, demos or site-packages), sorted."""
    root = stdlib_path()
    files = (p for p in root.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts))
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def doc_topics() -> list[str]:
    """Topic names of the reference documentation that pydoc ships (`help('assert')` etc.)."""
    return sorted(pydoc_data.topics.topics)


def topic_text(name: str) -> str:
    return pydoc_data.topics.topics[name]


def real_text_tokens(tokenizer: Any, count: int) -> list[int]:
    """`count` tokens of real English text: the reference documentation's topics in order."""
    text = "\n\n".join(topic_text(name) for name in doc_topics())
    tokens = tokenizer.encode(text, add_special_tokens=False)
    if len(tokens) < count:
        raise ValueError(f"Only {len(tokens)} tokens of documentation text; asked for {count}.")
    return tokens[:count]


def topic_paragraphs(name: str) -> list[str]:
    """A topic's paragraphs (blank-line separated), without their surrounding newlines."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", topic_text(name)) if p.strip()]


@functools.lru_cache(maxsize=1)
def topic_words() -> tuple[str, ...]:
    """Distinct lowercase words of 5–9 letters in the documentation, sorted (not keywords)."""
    words: set[str] = set()
    for name in doc_topics():
        words.update(re.findall(r"\b[a-z]{5,9}\b", topic_text(name)))
    return tuple(sorted(words - set(keyword.kwlist) - set(keyword.softkwlist)))


@functools.lru_cache(maxsize=1)
def function_docs() -> tuple[FunctionDoc, ...]:
    """Documented public functions (docstring of 30+ characters) whose names are unique in the
    library, so that a question naming one has one answer."""
    found: list[FunctionDoc] = []
    root = stdlib_path()
    for path in source_files():
        text = read_source(path)
        if text is None:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    found.append(FunctionDoc(module, node.name, doc))
    names = collections.Counter(f.name for f in found)
    return tuple(f for f in found if names[f.name] == 1 and len(f.doc) >= 30)
