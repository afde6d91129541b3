"""Answerable facts found in a document without a model, each with the span that grounds it.

Kinds (what they become in offline.py):
  faq      an FAQ entry: its own question, its answer paragraph
  section  a heading and the paragraphs under it ("What does the guide say about refunds?")
  number   a sentence holding an amount, a duration, a count... ("... within how many days?")
  yesno    a sentence "X is/can/must Y" turned around ("Can I return most items ...?")
  howto    an instruction sentence ("Should I avoid bleach ...?")
  kv       a list item "key: value" under a heading (teams, priorities)
  meta     a "Key: value" line about the document (Owner:, Last updated:)
  step     one item of a numbered list
  list     a whole list under its heading

The answer of every fact is `clean()` of its span (or, for a list of keys, words that all occur in
the span), so it can always be traced back to the document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loraline.synthesize.passages import Block, Document, Span, clean, sentences

NUM_WORDS = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fourteen|fifteen|twenty|thirty|forty|"
    "fifty|sixty|ninety|a hundred"
)
_NUM = rf"(?:\d+(?:[.,]\d+)?|{NUM_WORDS})"
_UNIT = r"(?:(?:business|working|calendar) )?(?:minute|hour|day|week|month|year)s?"
# (pattern, question phrase); the first match in a sentence wins.
QUANTITIES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\$\d[\d,]*(?:\.\d\d)?"), "how much"),
    (re.compile(rf"\b{_NUM}(?:(?: to | or |-){_NUM})? ({_UNIT})\b", re.I), "how many {unit}"),
    (re.compile(r"\b\d+ ?°?C(?: to \d+ ?°?C)?\b"), "what temperature"),
    (re.compile(r"\b\d+(?:\.\d+)? ?(?:mm|cm|kg|g|m)\b"), "what size"),
    (re.compile(r"\b\d+(?:\.\d+)? ?%"), "what percentage"),
    (re.compile(r"(?<=older than )\d+(?:\.\d+)+\b|(?<=version )\d+(?:\.\d+)+\b"), "which version"),
    (re.compile(rf"\b(?:at least |up to |all )?{_NUM} ([a-z]+s)\b", re.I), "how many {noun}"),
)
IMPERATIVE = frozenset(
    "always never please do don't wash avoid tumble rinse dry rub wipe use keep re-oil dust vacuum blot rotate "
    "check ask confirm look apply choose call open go raise reply drop include contact email write tell make "
    "set try restart remove install change press see shake store switch turn unplug let return send select "
    "click enter update".split()
)
AUX = {
    "is": "Is",
    "are": "Are",
    "can": "Can",
    "will": "Will",
    "must": "Must",
    "should": "Should",
    "may": "May",
    "cannot": "Can",
    "can't": "Can",
    "won't": "Will",
    "isn't": "Is",
    "aren't": "Are",
}
_YESNO = re.compile(r"^(?P<x>[A-Za-z][\w'’\-, ]{0,80}?) (?P<aux>" + "|".join(map(re.escape, AUX)) + r") (?P<y>.+)$")
_CLAUSE_END = re.compile(
    r"[;:]|, (?:but|which|so|and|as|because|with|usually)\b| and (?:is|are|can|will|should)\b| \("
)
_NOT_SUBJECT = re.compile(
    r"^(?:if|when|as|once|before|after|until|because|while|for|to|in|on|at|from|there|it|this|these|that|those)\b",
    re.I,
)
_CLAUSE_WORD = re.compile(r"\b(?:when|that|because|if|where|which|who|whether|than|so|and then)\b", re.I)
ANAPHORA = re.compile(r"^(?:this|that|these|those|it|they|both|below that|after that|otherwise)\b", re.I)
_KV = re.compile(r"^(?P<k>[^:.!?]{1,32}): (?P<v>\S.*)$")
_META = re.compile(r"^(?P<k>[A-Z][a-z]+(?: [a-z]+){0,2}): (?P<v>\S.*)$")


@dataclass(frozen=True)
class Fact:
    kind: str
    span: Span  # the grounding passage in the document
    answer: str
    slots: dict[str, str] = field(default_factory=dict)  # what the question templates fill in


def extract_facts(doc: Document) -> list[Fact]:
    """Every fact of a document, in reading order."""
    facts: list[Fact] = []
    sections: dict[str, list[Block]] = {}
    for block in doc.blocks:
        if block.kind == "faq":
            facts.append(_faq(doc, block))
            facts.extend(_sentence_facts(doc, block.answer, block))
        elif block.kind == "list":
            facts.extend(_list_facts(doc, block))
        else:
            facts.extend(_sentence_facts(doc, block.span, block))
            if block.heading:
                sections.setdefault(block.heading, []).append(block)
    for heading, blocks in sections.items():
        facts.append(_section(doc, heading, blocks))
    return facts


def _faq(doc: Document, block: Block) -> Fact:
    q = clean(doc.text[slice(*block.question)])
    return Fact(
        "faq", block.answer, clean(doc.text[slice(*block.answer)]), {"question": q, "topic": block.title or ""}
    )


def _section(doc: Document, heading: str, blocks: list[Block]) -> Fact:
    span = (blocks[0].span[0], blocks[-1].span[1])
    if len(clean(doc.text[slice(*span)])) > 1200:
        span = blocks[0].span
    answer = "\n\n".join(clean(doc.text[slice(*b.span)]) for b in blocks if b.span[1] <= span[1])
    return Fact("section", span, answer, {"heading": heading, "topic": blocks[0].title or ""})


def _context(doc: Document, spans: list[Span], i: int) -> Span:
    """Sentence i, widened to the previous sentence when it starts with "These"/"It"... and to the
    next when that one does, so the answer stands on its own."""
    start, end = spans[i]
    if ANAPHORA.match(clean(doc.text[start:end])) and i > 0:
        start = spans[i - 1][0]
    if i + 1 < len(spans) and ANAPHORA.match(clean(doc.text[slice(*spans[i + 1])])):
        end = spans[i + 1][1]
    return start, end


def _sentence_facts(doc: Document, span: Span, block: Block) -> list[Fact]:
    """The meta, number, howto and yesno facts of each sentence of `span`, in reading order."""
    spans = sentences(doc.text, span)
    out: list[Fact] = []
    for i, (s, e) in enumerate(spans):
        sentence = clean(doc.text[s:e])
        meta = _meta_fact(sentence, (s, e), block)
        if meta is not None:
            out.append(meta)
            continue
        if len(sentence.split()) < 4 or ANAPHORA.match(sentence):
            continue
        ctx = _context(doc, spans, i)
        answer = clean(doc.text[slice(*ctx)])
        slots = {"sentence": sentence, "heading": block.heading or "", "topic": block.title or ""}
        first = sentence.split()[0].lower().strip(",")
        imperative = first in IMPERATIVE
        number = _number_fact(sentence, ctx, answer, slots, imperative)
        if number is not None:
            out.append(number)
        if imperative:
            out.append(Fact("howto", ctx, answer, slots))
            continue
        yesno = _yesno_fact(sentence, ctx, answer, slots)
        if yesno is not None:
            out.append(yesno)
    return out


def _meta_fact(sentence: str, span: Span, block: Block) -> Fact | None:
    """A "Key: value" line about the document (Owner:, Last updated:), when the value is short."""
    meta = _META.match(sentence)
    if not meta or len(meta.group("v")) >= 120:
        return None
    return Fact(
        "meta",
        span,
        sentence,
        {"key": meta.group("k"), "value": meta.group("v").rstrip("."), "topic": block.title or ""},
    )


def _number_fact(sentence: str, ctx: Span, answer: str, slots: dict[str, str], imperative: bool) -> Fact | None:
    """The sentence's first quantity (QUANTITIES' order), with the question phrase that asks for it."""
    for pattern, phrase in QUANTITIES:
        m = pattern.search(sentence)
        if m:
            unit = m.group(1).lower() if "{unit}" in phrase else ""
            unit = unit if unit.endswith("s") else unit + "s"
            noun = m.group(1).lower() if "{noun}" in phrase else ""
            wh = phrase.format(unit=unit, noun=noun)
            return Fact(
                "number",
                ctx,
                answer,
                {
                    **slots,
                    "wh": wh,
                    "quantity": m.group(0),
                    "before": sentence[: m.start()],
                    "after": sentence[m.end() :],
                    "imperative": "1" if imperative else "",
                },
            )
    return None


def _yesno_fact(sentence: str, ctx: Span, answer: str, slots: dict[str, str]) -> Fact | None:
    """A sentence "X is/can/must Y" whose X is a plain subject of at most ten words, turned around."""
    m = _YESNO.match(sentence)
    if (
        not m
        or _NOT_SUBJECT.match(m.group("x"))
        or len(m.group("x").split()) > 10
        or _CLAUSE_WORD.search(m.group("x"))
    ):
        return None
    y = _CLAUSE_END.split(m.group("y"), maxsplit=1)[0].rstrip(" .,!")
    if len(y.split()) < 1:
        return None
    return Fact(
        "yesno",
        ctx,
        answer,
        {
            **slots,
            "aux": AUX[m.group("aux").lower()],
            "x": re.sub(r"\s*\([^)]*\)", "", m.group("x")),
            "y": y,
        },
    )


def _list_facts(doc: Document, block: Block) -> list[Fact]:
    heading = block.heading or block.title or ""
    items = [(item, clean(doc.text[slice(*item.span)])) for item in block.items]
    out: list[Fact] = []
    kvs = [(item, _KV.match(text)) for item, text in items]
    if kvs and all(m for _, m in kvs):
        for item, m in kvs:
            assert m is not None
            out.append(
                Fact(
                    "kv",
                    item.span,
                    clean(doc.text[slice(*item.span)]),
                    {"key": m.group("k"), "value": m.group("v"), "heading": heading, "topic": block.title or ""},
                )
            )
        keys = ", ".join(m.group("k") for _, m in kvs if m)
        out.append(Fact("list", block.span, keys, {"heading": heading, "topic": block.title or "", "keys": "1"}))
        return out
    for n, (item, text) in enumerate(items):
        if item.number is not None:
            prev = items[n - 1][1].split(".")[0] if n else ""
            out.append(
                Fact(
                    "step",
                    item.span,
                    text,
                    {"heading": heading, "number": str(item.number), "previous": prev, "topic": block.title or ""},
                )
            )
    listed = "\n".join(f"{item.number}. {text}" if item.number is not None else f"- {text}" for item, text in items)
    if len(listed) <= 1500:
        out.append(Fact("list", block.span, listed, {"heading": heading, "topic": block.title or "", "keys": ""}))
    return out
