"""Documents split into blocks with exact character spans, so every synthetic row can point back at
the text it came from.

A block is a paragraph, a list (its items kept with their own spans), or an FAQ entry (a line that is
bold on its own, e.g. `**How long does delivery take?**`, followed by its answer). Headings are
markdown `#` lines, or in plain text a line in capitals (`LINEN AND COTTON BEDDING`). Spans index the
original document text; `clean` turns a span into plain text (markup dropped, whitespace collapsed)
and is the one normalisation that answers and the grounding check share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Span = tuple[int, int]

_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_LIST_ITEM = re.compile(r"^(\s*)([-*+]|\d{1,3}[.)])\s+")
_FAQ_LINE = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]*_]*\s+(?=[\"'(*_]*[A-Z0-9])")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "approx.", "no.", "Mr.", "Ms.", "Dr.")


@dataclass(frozen=True)
class Item:
    """One list item: its span, and its number when the list is ordered."""

    span: Span
    number: int | None


@dataclass(frozen=True)
class Block:
    kind: str  # "paragraph" | "list" | "faq"
    span: Span
    heading: str | None  # nearest heading above the block (None under the title only)
    title: str | None  # the document's first heading
    items: tuple[Item, ...] = ()  # lists
    question: Span | None = None  # faq: the bold line, without its ** markers
    answer: Span | None = None  # faq: the text under it


@dataclass(frozen=True)
class Document:
    """A tenant document as the generators see it: path relative to the documents folder, text, hash."""

    source: str
    text: str
    sha256: str
    blocks: list[Block] = field(default_factory=list)


def clean(text: str) -> str:
    """Plain text of a span: emphasis and code markers removed, whitespace collapsed."""
    text = re.sub(r"\*\*|__|`", "", text)
    text = re.sub(r"(?<!\w)_(\S(?:[^_]*\S)?)_(?!\w)", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _plain_heading(line: str, suffix: str) -> str | None:
    m = _MD_HEADING.match(line)
    if m:
        return clean(m.group(2))
    stripped = line.strip()
    letters = [c for c in stripped if c.isalpha()]
    if suffix == ".txt" and len(letters) >= 3 and len(stripped) <= 80 and not any(c.islower() for c in letters):
        return stripped.title() if not _MD_HEADING.match(stripped) else stripped
    return None


def split_blocks(text: str, suffix: str = ".md") -> list[Block]:
    """Blocks of a document in reading order (headings themselves are not blocks)."""
    lines: list[tuple[int, str]] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        lines.append((pos, line.rstrip("\r\n")))
        pos += len(line)

    blocks: list[Block] = []
    title: str | None = None
    heading: str | None = None
    current: list[tuple[int, str]] = []

    def flush() -> None:
        if current:
            blocks.append(_make_block(current, heading, title))
            current.clear()

    for start, line in lines:
        if not line.strip():
            flush()
            continue
        head = _plain_heading(line, suffix)
        if head is not None:
            flush()
            if title is None:
                title = head
            else:
                heading = head
            continue
        if current and _starts_new_block(current, line):
            flush()
        current.append((start, line))
    flush()
    return blocks


def _starts_new_block(current: list[tuple[int, str]], line: str) -> bool:
    first = current[0][1]
    if _FAQ_LINE.match(line):
        return True
    # a list directly under a paragraph, or a paragraph directly under a list
    return bool(_LIST_ITEM.match(line)) != bool(_LIST_ITEM.match(first)) and not line.startswith((" ", "\t"))


def _make_block(lines: list[tuple[int, str]], heading: str | None, title: str | None) -> Block:
    start = lines[0][0]
    end = lines[-1][0] + len(lines[-1][1])
    first = lines[0][1]
    faq = _FAQ_LINE.match(first)
    if faq and len(lines) > 1:
        q_start = start + first.index("**") + 2
        return Block(
            kind="faq",
            span=(start, end),
            heading=heading,
            title=title,
            question=(q_start, q_start + len(faq.group(1))),
            answer=(lines[1][0], end),
        )
    if _LIST_ITEM.match(first):
        items: list[Item] = []
        item_start: int | None = None
        item_end = start
        number: int | None = None
        for line_start, line in lines:
            m = _LIST_ITEM.match(line)
            if m and len(m.group(1)) <= 1:
                if item_start is not None:
                    items.append(Item((item_start, item_end), number))
                item_start = line_start + m.end()
                marker = m.group(2).rstrip(".)")
                number = int(marker) if marker.isdigit() else None
            item_end = line_start + len(line)
        if item_start is not None:
            items.append(Item((item_start, item_end), number))
        return Block(kind="list", span=(start, end), heading=heading, title=title, items=tuple(items))
    return Block(kind="paragraph", span=(start, end), heading=heading, title=title)


def sentences(text: str, span: Span) -> list[Span]:
    """Sentence spans inside `span` of `text` (a regex splitter that knows a few abbreviations)."""
    s, e = span
    chunk = text[s:e]
    out: list[Span] = []
    begin = 0
    for m in _SENTENCE_END.finditer(chunk):
        before = chunk[begin : m.start()]
        if before.rstrip("\"')]*_").endswith(_ABBREVIATIONS):
            continue
        out.append((s + begin, s + m.start()))
        begin = m.end()
    if chunk[begin:].strip():
        out.append((s + begin, s + len(chunk.rstrip())))
    return [(a + _lead(text[a:b]), b) for a, b in out if text[a:b].strip()]


def _lead(s: str) -> int:
    return len(s) - len(s.lstrip())


def make_document(source: str, text: str, sha256: str) -> Document:
    suffix = "." + source.rsplit(".", 1)[-1].lower() if "." in source else ""
    return Document(source=source, text=text, sha256=sha256, blocks=split_blocks(text, suffix))
