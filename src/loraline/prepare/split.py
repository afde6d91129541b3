"""Identity of a row (normalized content hash), exact deduplication and the hash-based split.

The split depends only on the row's own content and the salt, so adding, removing or reordering
other rows never moves a row between train, validation and test. A row in a group (rows sharing a
context: tenants.<t>.sources[].group, or the long line that prepare.group_min_chars finds) is split
by the hash of its group's key instead of its content hash, so a group goes whole to one split and
no passage is both trained on and tested.

The automatic key is cheap and needs no other row: the longest line (normalized) of the first user
turn, when that turn holds other text too (a passage and its question) and the line has at least
group_min_chars characters, keyed by its words (quality.words). Rows asking about one passage share
it; a passage quoted once is a group of one (split by the passage's hash, like any row by its own).
Only the first user turn is read: a long system prompt is the tenant's instructions, shared by all
its rows, and grouping on it would put the tenant in one split.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable

from loraline.config import SplitParams
from loraline.prepare.quality import words


def normalize(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped: what counts as 'the same text'.

    str.split() splits on exactly the characters the regex \\s matches (str.isspace; a test checks every
    code point), so this equals re.sub(r"\\s+", " ", text).strip(), ~5x faster.
    """
    return " ".join(unicodedata.normalize("NFKC", text).split())


def content_hash(turns: Iterable[tuple[str, str]]) -> str:
    """sha256 of the normalized (role, content) pairs; a document is the single pair ('document', text).

    Roles are part of the identity: the same words said by the user or by the assistant are different
    training rows.
    """
    payload = json.dumps(
        [[role, normalize(content)] for role, content in turns], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def group_of(messages: Iterable, named: str | None, min_chars: int | None) -> str | None:
    """The key of a row's group (messages with .role and .content): the `named` value
    (sources[].group), else the long line of the first user turn, else None (no group)."""
    if named is not None:
        return "group\x00" + normalize(named)
    first = next((m.content for m in messages if m.role == "user"), "")
    longest = context_line(first, min_chars)
    if longest is None:
        return None
    # Its words (case-folded, punctuation aside), as near-dedup compares: a copy with other case or
    # punctuation stays in its original's group, where near-dedup finds it.
    return "context\x00" + " ".join(words(longest))


def context_line(prompt: str, min_chars: int | None) -> str | None:
    """The longest line of `prompt` (as written) when the prompt holds other text too and the line,
    normalized, has at least min_chars characters: a passage the question is asked about."""
    if min_chars is None:
        return None
    lines = [line for line in prompt.splitlines() if line.strip()]
    if len(lines) < 2:  # the whole prompt is one line: no shared context apart from the question
        return None
    longest = max(lines, key=lambda line: len(normalize(line)))
    return longest if len(normalize(longest)) >= min_chars else None


def split_key(content_hash_hex: str, group: str | None) -> str:
    """What the split hashes: the group's key when the row has one, else its content hash."""
    return content_hash_hex if group is None else hashlib.sha256(group.encode("utf-8", "surrogatepass")).hexdigest()


def group_id(group: str | None) -> int:
    """A group key as a signed 64-bit number for array("q"); 0 for no group."""
    return 0 if group is None else (int(split_key("", group)[:16], 16) - (1 << 63)) or 1


def prompt_key(messages: Iterable[dict]) -> int:
    """64 bits of the content hash with every assistant turn blanked: rows with the same key and a
    different content hash ask the same thing (system, user and tool turns alike, in the same order)
    and answer it differently."""
    digest = content_hash((m["role"], "" if m["role"] == "assistant" else m["content"]) for m in messages)
    return int(digest[:16], 16) - (1 << 63)  # signed, for array("q")


def bucket(content_hash_hex: str, salt: str) -> float:
    """First 8 bytes of sha256(salt + content_hash) as a fraction in [0, 1)."""
    digest = hashlib.sha256((salt + content_hash_hex).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(content_hash_hex: str, params: SplitParams) -> str:
    b = bucket(content_hash_hex, params.salt)
    if b < params.test:
        return "test"
    if b < params.test + params.validation:
        return "validation"
    return "train"


class Deduplicator:
    """Remembers the first kept occurrence of every content hash (feed rows in sorted file, row order)."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[str, int]] = {}

    def keep(self, content_hash_hex: str, source_file: str, row: int) -> None:
        self._first.setdefault(content_hash_hex, (source_file, row))

    def duplicate(self, content_hash_hex: str, source_file: str, row: int) -> dict | None:
        """The duplicates.jsonl entry when this hash was kept before, else None."""
        original = self._first.get(content_hash_hex)
        if original is None:
            return None
        return {
            "source_file": source_file,
            "row": row,
            "duplicate_of_file": original[0],
            "duplicate_of_row": original[1],
            "content_hash": content_hash_hex,
        }
