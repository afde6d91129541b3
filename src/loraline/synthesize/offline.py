"""The offline generator: questions phrased from templates around facts the document states itself.

No model, so it runs anywhere and repeats byte for byte under the seed. Answers are the document's
own words (facts.py); only the questions vary: several templates per fact kind, customer-style and
agent-style, then a style pass (greeting, thanks, casual lower case, a topic tag in front or
behind) and, when the tenant lists seed tasks, their framing (e.g. "Customer email:"). Each fact
draws from its own random stream (seeded by the seed, the document and the span), so editing one
document leaves the rows of the others unchanged.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence

from loraline.config import SeedTask
from loraline.provenance import sha256_bytes
from loraline.synthesize.base import Generated
from loraline.synthesize.facts import Fact, extract_facts
from loraline.synthesize.passages import Document

# Question templates per fact kind. {doc} names the document, {h} its section, {q} an FAQ question.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "faq": (
        "{q}",
        "{q_statement}",
        "Question about {topic_l}: {q}",
        "{q} ({topic_l})",
        'A customer writes: "{q}" What should I tell them?',
        "Can you help? {q}",
    ),
    "section": (
        "What does {doc} say about {h}?",
        "Tell me about {h}.",
        "What should I know about {h}?",
        "I have a question about {h}. What's the rule?",
        "What's our guidance on {h}? A customer is asking.",
        "{H}: what do I need to know?",
    ),
    "number": (
        "{insitu}",
        "{fronted}",
        "According to {doc}, {insitu_l}",
        "{H}: {insitu_l}",
        "Someone asks: {insitu_l} What's the answer?",
    ),
    "yesno": (
        "{yesno}",
        "{H}: {yesno_l}",
        "Just checking, {yesno_l}",
        "Per {doc}, {yesno_l}",
    ),
    "howto": (
        "Should I {imperative}?",
        "{H}: should I {imperative}?",
        "Is it right to {imperative}?",
        "What does {doc} say: should I {imperative}?",
    ),
    "kv": (
        "What is {key}?",
        "What does {key} mean?",
        "What does {the_key_sing} cover?",
        "In {h}, what is {key}?",
        "Which {sing} covers {element}?",
        "Under which {sing} does {element} fall?",
    ),
    "meta": (
        "{meta_q}",
        "What is the {meta_generic} of {doc}?",
        "{doc_cap}: {key_l}?",
    ),
    "step": (
        "What is step {number} of {h}?",
        "In {h}, what do I do at step {number}?",
        'What comes after "{previous}"?',
        "{H}, step {number}: what is it?",
    ),
    "list": (
        "What are the {h}?",
        "List the {h}.",
        "Walk me through the {h}.",
        "Which {h} are there?",
    ),
}
STYLES: tuple[str, ...] = (
    "{q}",
    "{q}",
    "{q}",
    "Hi, {q_l}",
    "Hello! {q}",
    "Quick question: {q_l}",
    "{q} Thanks!",
    "{q} Thank you.",
    "{q_lower}",
    "Please help: {q_l}",
)
META_QUESTIONS = {
    "owner": "Who owns {doc}?",
    "applies to": "What does {doc} apply to?",
    "last updated": "When was {doc} last updated?",
}
PREPOSITIONS = ("within", "after", "in", "for", "at", "over", "under", "before", "every")
MODALS = ("can", "will", "must", "should", "may")
_SWAP = {"you": "I", "your": "my", "yours": "mine", "we": "you", "our": "your", "us": "you"}
TEMPLATE_SHA256 = sha256_bytes(
    json.dumps({"templates": TEMPLATES, "styles": STYLES, "meta": META_QUESTIONS}, sort_keys=True).encode()
)


class OfflineGenerator:
    """Rule-based, deterministic; see the module docstring."""

    name = "offline"
    model = None
    template_sha256 = TEMPLATE_SHA256

    def __init__(self, questions_per_fact: int = 3) -> None:
        self.questions_per_fact = questions_per_fact

    def generate(self, doc: Document, seed: int, seed_tasks: Sequence[SeedTask] = ()) -> Iterator[Generated]:
        proper = _proper_nouns(doc.text)
        styles = [(i, s) for i, s in enumerate(seed_style(t) for t in seed_tasks) if s]
        for fact in extract_facts(doc):
            rng = random.Random(f"{seed}|{doc.source}|{fact.kind}|{fact.span[0]}|{fact.span[1]}")
            slots = _slots(fact, doc, proper, rng)
            candidates = [t for t in TEMPLATES[fact.kind] if _fillable(t, slots)]
            rng.shuffle(candidates)
            seen: set[str] = set()
            for template in candidates:
                if len(seen) >= self.questions_per_fact:
                    break
                question = _tidy(template.format(**slots))
                question, used = _style(question, rng, proper, styles, framed=not template.startswith("{"))
                if question in seen:
                    continue
                seen.add(question)
                yield Generated(
                    question=question,
                    answer=fact.answer,
                    source=doc.source,
                    span=fact.span,
                    seed_tasks=used,
                    method=f"{fact.kind}:{TEMPLATES[fact.kind].index(template)}",
                )

    def usage(self) -> dict:
        return {}


def seed_style(task: SeedTask) -> dict | None:
    """What a seed task's instruction says about phrasing: a framing prefix and lower case."""
    text = task.instruction.strip()
    prefix = None
    m = re.match(r"^([^?\n]{3,60}?:)\s", text)
    if m:
        prefix = m.group(1)
    else:
        parts = re.split(r"(?<=[.!])\s+", text, maxsplit=1)
        if len(parts) == 2 and not parts[0].endswith("?") and len(parts[0]) <= 100:
            prefix = parts[0]
    lower = text == text.lower() and any(c.isalpha() for c in text)
    if prefix is None and not lower:
        return None
    return {"prefix": prefix, "lower": lower}


def _style(
    question: str, rng: random.Random, proper: set[str], styles: list[tuple[int, dict]], framed: bool = False
) -> tuple[str, list[int]]:
    if styles and rng.random() < 0.5:
        index, style = styles[rng.randrange(len(styles))]
        if style["lower"]:
            question = question.lower()
        if style["prefix"]:
            question = f"{style['prefix']} {question}"
        return question, [index]
    # a question already framed ("Teams: what is P1?") gets no second frame in front
    framed = framed or ":" in question[:50]
    options = [s for s in STYLES if not s.startswith(("Hi", "Hello", "Quick", "Please"))] if framed else STYLES
    style = options[rng.randrange(len(options))]
    return style.format(q=question, q_l=_lower_first(question, proper), q_lower=question.lower().rstrip("?")), []


def _slots(fact: Fact, doc: Document, proper: set[str], rng: random.Random) -> dict[str, str]:
    s = dict(fact.slots)
    topic = s.get("topic") or doc.source.rsplit("/", 1)[-1].rsplit(".", 1)[0].replace("_", " ")
    heading = s.get("heading") or topic.split(":")[0]
    h = re.sub(r"\s*\([^)]*\)", "", heading).strip()
    h_l = " ".join(w if _keep_case(w, proper) else w.lower() for w in h.split())
    s.update(
        h=h_l,
        H=h_l[:1].upper() + h_l[1:],
        topic_l=_lower_first(topic.split(":")[0], proper),
        doc=_doc_ref(topic, doc.source, rng),
        sing=_singular(h_l),
    )
    s["doc_cap"] = s["doc"][:1].upper() + s["doc"][1:]
    if fact.kind == "faq":
        q = s["question"]
        s["q"] = q
        s["q_statement"] = q if q.endswith("?") else f"{q} What should I do?"
    elif fact.kind == "number":
        before, after = _swap(s["before"]), _swap(s["after"])
        clause = re.split(r"[;:]|, (?:and|but|so|which)\b", after, maxsplit=1)[0].rstrip(" .,!")
        insitu = f"{before}{s['wh']}{clause}?"
        imperative = s["imperative"] == "1"  # "Wash at what temperature?" reads wrong: only the fronted form
        s["insitu"] = "" if imperative else _upper_first(insitu)
        s["insitu_l"] = "" if imperative else _lower_first(insitu, proper)
        s["fronted"] = _fronted(s["before"], s["wh"], s["imperative"] == "1", proper) or ""
    elif fact.kind == "yesno":
        x = _swap(s["x"]) if s["x"].lower() not in ("you", "we") else _SWAP[s["x"].lower()]
        y = _swap(s["y"])
        yesno = f"{s['aux']} {_lower_first(x, proper) if x != 'I' else x} {y}?"
        s["yesno"], s["yesno_l"] = yesno, _lower_first(yesno, proper)
    elif fact.kind == "howto":
        imperative = re.split(r"[;:]|, (?:which|so|and|but|as|don't|never)\b", s["sentence"], maxsplit=1)[0].rstrip(
            " .,!"
        )
        words = imperative.split()
        if words and words[0].lower() in ("always", "please"):
            words = words[1:]
        if words and words[0].lower() in ("never", "don't", "do"):
            words = []  # "Should I never ..." reads wrong; a negative rule is asked through other kinds
        s["imperative"] = _swap(_lower_first(" ".join(words), proper)) if words else ""
    elif fact.kind == "kv":
        s["key_l"] = s["key"]
        s["the_key_sing"] = f"the {s['key']} {s['sing']}" if s["sing"] else s["key"]
        elements = [e.strip(" .") for e in re.split(r",| and | or ", s["value"])]
        short = [e for e in elements if e and len(e.split()) <= 3]
        s["element"] = rng.choice(short) if len(short) >= 3 and len(short) == len(elements) else ""
    elif fact.kind == "meta":
        key = s["key"].lower()
        s["key_l"] = key
        s["meta_q"] = META_QUESTIONS.get(key, "What is the {key_l} of {doc}?").format(**s)
        s["meta_generic"] = "" if key in META_QUESTIONS else key
    elif fact.kind == "step":
        s["previous"] = s["previous"] if s["number"] != "1" and s["previous"] else ""
    elif fact.kind == "list" and s.get("keys"):
        s["h"] = h_l
    return s


def _fillable(template: str, slots: dict[str, str]) -> bool:
    names = re.findall(r"{(\w+)}", template)
    return all(slots.get(n) for n in names)


def _fronted(before: str, wh: str, imperative: bool, proper: set[str]) -> str | None:
    """'Within how many days can I return most items?' from 'You can return most items within 30 days'."""
    words = before.split()
    if len(words) < 3 or words[-1].lower() not in PREPOSITIONS:
        return None
    prep, rest = words[-1], words[:-1]
    if imperative:
        head = [w for w in rest if w.lower() not in ("always", "please")]
        body = _swap(_lower_first(" ".join(head), proper))
        return f"{prep.capitalize()} {wh} should I {body}?"
    for i, w in enumerate(rest):
        if w.lower() in MODALS and i > 0:
            subject = " ".join(rest[:i])
            subject = _SWAP.get(subject.lower(), _swap(_lower_first(subject, proper)))
            return f"{prep.capitalize()} {wh} {w.lower()} {subject} {_swap(' '.join(rest[i + 1 :]))}?"
    return None


def _doc_ref(topic: str, source: str, rng: random.Random) -> str:
    name = (topic + " " + source).lower()
    for kind in ("runbook", "faq", "guide", "policy"):
        if kind in name:
            word = "FAQ" if kind == "faq" else kind
            return rng.choice([f"the {word}", f'"{topic}"'])
    return rng.choice(["our documentation", f'"{topic}"'])


def _singular(h: str) -> str:
    last = h.split()[-1] if h.split() else ""
    if len(h.split()) != 1:
        return ""
    if last.endswith("ies"):
        return last[:-3] + "y"
    return last[:-1] if last.endswith("s") and not last.endswith("ss") else ""


def _swap(text: str) -> str:
    """Second person to first and first to second: the customer asks about what the document tells them."""

    def repl(m: re.Match[str]) -> str:
        word = m.group(0)
        out = _SWAP[word.lower()]
        if (
            word.lower() == "you"
            and m.start() > 0
            and not re.search(r"(?:^|[,;] |\b(?:if|when|so|until|and|or) )$", text[: m.start()], re.I)
        ):
            out = "me"
        return out if not word[0].isupper() or out == "I" else out.capitalize()

    return re.sub(r"\b(?:you|your|yours|we|our|us)\b", repl, text, flags=re.I)


def _proper_nouns(text: str) -> set[str]:
    """Words capitalised mid-sentence somewhere in the document (Acme, Okta, Outlook): never lower-cased."""
    return {m.group(1) for m in re.finditer(r"(?<=[a-z,;] )([A-Z][\w'’-]*)", text)}


def _keep_case(word: str, proper: set[str]) -> bool:
    bare = word.strip("\"'(),.:;")
    return bare in proper or sum(c.isupper() for c in bare) > 1 or any(c.isdigit() for c in bare) or bare == "I"


def _lower_first(text: str, proper: set[str]) -> str:
    word = text.split(" ", 1)[0]
    return text if not text or _keep_case(word, proper) else text[:1].lower() + text[1:]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _tidy(question: str) -> str:
    question = re.sub(r"\s+", " ", question).strip()
    return re.sub(r"\?\?+", "?", question.replace(" ?", "?"))
