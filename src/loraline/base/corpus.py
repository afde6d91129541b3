"""The offline base model's pretraining corpus, from local text only.

Three sources, each deterministic:
- the tenants' raw *documents* (.txt/.md). Instruction rows (.jsonl/.json/.csv/.parquet) are never
  read here: they include the rows held out for testing, and pretraining on them would leak the
  test set into the base model and inflate every adapter-vs-base comparison.
- docstrings of the Python standard library, read with `ast` (never imported: importing runs code),
  as a stock of general English prose that exists on every machine with Python.
- generic chat exercises (exercises.py), rendered with the chat template. Their prompts are random
  words, pure noise to a language model, so pretraining takes loss on their answers only
  (`answer_starts` marks where each answer begins).
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loraline.base.exercises import make_copy_drills, make_exercises
from loraline.modelling.chat import render_chat

DOCUMENT_SUFFIXES = (".txt", ".md")
# Stdlib folders that are tests, demos or vendored code: their docstrings are noise, not prose.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "turtledemo", "lib2to3", "ensurepip"}
_MIN_DOCSTRING_CHARS = 40


@dataclass
class Corpus:
    """Texts by source, in the order they were collected."""

    documents: list[str] = field(default_factory=list)
    document_files: list[str] = field(default_factory=list)
    stdlib: list[str] = field(default_factory=list)
    exercises: list[str] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)  # per exercise: character where the answer begins
    drills: list[str] = field(default_factory=list)  # copy drills for the first steps (BuildParams.copy_drill_steps)
    drill_answer_starts: list[int] = field(default_factory=list)

    def sources(self) -> dict[str, list[str]]:
        return {"documents": self.documents, "stdlib": self.stdlib, "exercises": self.exercises, "drills": self.drills}

    def answer_starts_of(self, source: str) -> list[int] | None:
        """Where each text's answer begins, for the sources that take loss on answers only."""
        return {"exercises": self.answer_starts, "drills": self.drill_answer_starts}.get(source)

    def sha256(self) -> str:
        """One hash over every text, source by source: equal corpus <=> equal hash."""
        h = hashlib.sha256()
        for name, texts in self.sources().items():
            h.update(name.encode() + b"\0")
            for t in texts:
                h.update(hashlib.sha256(t.encode("utf-8")).digest())
        return h.hexdigest()


def read_documents(raw_dirs: list[Path]) -> tuple[list[str], list[str]]:
    """Text of every .txt/.md file under `raw_dirs` (recursive, sorted), and their display paths."""
    texts, names = [], []
    for raw in raw_dirs:
        raw = Path(raw)
        if not raw.is_dir():
            continue
        for path in sorted(p for p in raw.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES):
            if any(part.startswith(".") for part in path.relative_to(raw).parts):
                continue  # .dvc/.git internals, editor backups
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # the prepare stage reports unreadable files; the base just skips them
            text = text.replace("\r\n", "\n").strip()
            if text:
                texts.append(text)
                names.append(f"{raw.name}/{path.relative_to(raw).as_posix()}")
    return texts, names


def stdlib_docstrings(max_chars: int, stdlib_dir: Path | None = None) -> list[str]:
    """Module, class and function docstrings of the standard library, up to `max_chars` in total.

    Files are visited in the order of the hash of their relative path -- a fixed shuffle -- so that a
    small cap still samples the whole library instead of only modules starting with 'a'. Parsing
    stops as soon as the cap is reached. The result depends on the Python version (recorded).
    """
    if max_chars <= 0:
        return []
    out: list[str] = []
    total = 0
    for _, doc in _docstrings_by_file(stdlib_dir):
        doc = doc[: max_chars - total]
        out.append(doc)
        total += len(doc)
        if total >= max_chars:
            return out
    return out


def held_out_docstrings(pretrained_chars: int, count: int, stdlib_dir: Path | None = None) -> list[str]:
    """Up to `count` docstrings the base never saw: from the files after the one where
    stdlib_docstrings(pretrained_chars) stopped (none of a file it read from), in the same fixed order, so
    they are the pretraining prose's own kind, held out. `pretrained_chars` 0: from the first file."""
    out: list[str] = []
    total, stop_file = 0, -1
    for index, doc in _docstrings_by_file(stdlib_dir):
        if total < pretrained_chars:
            total += len(doc)
            stop_file = index
        elif index > stop_file:
            out.append(doc)
            if len(out) == count:
                break
    return out


def _docstrings_by_file(stdlib_dir: Path | None) -> Iterator[tuple[int, str]]:
    """(file number, docstring) of the standard library in the fixed file order, each text once."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not (_STDLIB_SKIP & set(p.relative_to(root).parts[:-1])) and not p.name.startswith("test_")
    ]
    files.sort(key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())
    seen: set[str] = set()
    for index, path in enumerate(files):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        nodes = [
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)),
        ]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < _MIN_DOCSTRING_CHARS or doc in seen:
                continue
            seen.add(doc)
            yield index, doc


def _render(exercises: list[tuple[str, list[dict[str, str]]]]) -> tuple[list[str], list[int]]:
    texts, starts = [], []
    for _, messages in exercises:
        texts.append(render_chat(messages))
        starts.append(len(render_chat(messages[:-1], add_generation_prompt=True)))
    return texts, starts


def build_corpus(
    raw_dirs: list[Path], *, stdlib: bool, max_stdlib_chars: int, exercises: int, seed: int, drills: int = 0
) -> Corpus:
    """Collect the three sources, and `drills` copy drills for the first steps."""
    docs, names = read_documents(raw_dirs)
    texts, starts = _render(make_exercises(exercises, seed))
    drill_texts, drill_starts = _render(make_copy_drills(drills, seed))
    return Corpus(
        documents=docs,
        document_files=names,
        stdlib=stdlib_docstrings(max_stdlib_chars) if stdlib else [],
        exercises=texts,
        answer_starts=starts,
        drills=drill_texts,
        drill_answer_starts=drill_starts,
    )


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
