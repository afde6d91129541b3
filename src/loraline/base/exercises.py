"""Generic chat exercises mixed into the offline base model's pretraining corpus.

A base model pretrained on prose alone has never seen a chat turn, so a small adapter would have to
learn the chat format, copying and JSON syntax from a few hundred tenant rows at once. These
exercises teach those *skills* -- copy a span or number from the prompt, turn facts into a JSON
object, pick a label from a list given in the prompt, answer yes/no -- with random vocabulary and
random keys, so no tenant's schema, keys or labels are learnt here: the adapter still has to learn
those, which is what makes the base-vs-adapter comparison meaningful.

Everything is drawn from one `random.Random(seed)`, so the same seed gives the same exercises.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

# Neutral everyday words. Deliberately free of business/ticketing vocabulary (order, refund, team,
# priority, urgent, ...) so that tenant-specific keys and labels are never pretrained.
WORDS = (
    "apple river stone cloud garden window pencil candle forest bridge mirror silver copper marble "
    "lantern harbor meadow valley island planet rocket violin piano guitar tiger rabbit falcon "
    "dolphin turtle pepper ginger lemon cherry olive walnut basket ladder hammer needle thread "
    "button pocket jacket carpet blanket pillow kettle teapot spoon bottle wallet "
    "camera laptop signal engine wheel anchor compass saddle helmet feather pebble crystal "
    "desert glacier canyon summit coral amber ivory indigo crimson scarlet yellow purple orange "
    "green silent gentle bright quiet rapid heavy hollow narrow smooth rough early late "
    "north south east west winter summer autumn spring morning evening breeze thunder shadow "
    "castle tower village market museum library station airport theatre kitchen cellar attic "
    "balcony chimney fountain statue painter baker farmer sailor pilot doctor tailor miner "
    "dancer singer writer reader runner swimmer climber builder keeper hunter"
).split()

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_FILLER = "the a this that with from into over under near after before and or but then".split()


def pseudo_word(rng: random.Random, syllables: int | None = None) -> str:
    """A pronounceable made-up word ('vomari'): vocabulary no real dataset can share."""
    n = syllables or rng.randint(2, 3)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))


def word(rng: random.Random) -> str:
    return rng.choice(WORDS) if rng.random() < 0.6 else pseudo_word(rng)


def key_name(rng: random.Random) -> str:
    parts = [word(rng) for _ in range(rng.choice((1, 1, 2)))]
    return "_".join(parts)


def sentence(rng: random.Random, n: int | None = None, include: list[str] | None = None) -> str:
    """A run of random words (with the words in `include` placed at random positions)."""
    n = n or rng.randint(5, 14)
    toks = [rng.choice(_FILLER) if rng.random() < 0.3 else word(rng) for _ in range(n)]
    for w in include or ():
        toks.insert(rng.randint(0, len(toks)), w)
    text = " ".join(toks)
    return text[0].upper() + text[1:] + rng.choice(".!?.")


def passage(rng: random.Random, most: int = 4) -> str:
    """One to `most` sentences: distractor text, so that answers must be found at a distance."""
    return " ".join(sentence(rng) for _ in range(rng.randint(1, most)))


def code_value(rng: random.Random) -> str:
    """Something to copy exactly: a number, an id with a prefix, or a word."""
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randint(10, 999_999))
    if kind == 1:
        prefix = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(rng.randint(1, 3)))
        return f"{prefix}-{rng.randint(100, 99_999)}"
    if kind == 2:
        return f"#{rng.randint(1000, 9_999_999)}"
    return pseudo_word(rng)


def _copy_span(rng: random.Random) -> tuple[str, str]:
    name = key_name(rng).replace("_", " ")
    value = code_value(rng)
    fact = rng.choice((f"{name}: {value}", f"{name} {value}", f"the {name} is {value}", f"({name} {value})"))
    text = " ".join([passage(rng), fact[0].upper() + fact[1:] + ".", passage(rng)][rng.randrange(2) :])
    ask = rng.choice(
        (
            f"What is the {name} in this text? Copy it exactly.\n\n{text}",
            f"{text}\n\nReturn only the {name}.",
            f"Find the {name}.\nText: {text}",
        )
    )
    return ask, value


def _typed_value(rng: random.Random) -> tuple[object, str]:
    """A JSON value and how it is written in the prompt's text."""
    kind = rng.randrange(5)
    if kind == 0:
        v = rng.randint(0, 99_999)
        return v, str(v)
    if kind == 1:
        b = rng.random() < 0.5
        return b, rng.choice(("yes", "true")) if b else rng.choice(("no", "false"))
    if kind == 2:
        v = code_value(rng)
        return v, v
    s = " ".join(word(rng) for _ in range(rng.randint(1, 3)))
    return s, s


def _fields(rng: random.Random) -> list[tuple[str, object, str]]:
    n = rng.randint(1, 5)
    keys: list[str] = []
    while len(keys) < n:
        k = key_name(rng)
        if k not in keys:
            keys.append(k)
    return [(k, *_typed_value(rng)) for k in keys]


def _kv_to_json(rng: random.Random) -> tuple[str, str]:
    fields = _fields(rng)
    lines = "\n".join(f"{k}{rng.choice((': ', ' = ', ': '))}{shown}" for k, _, shown in fields)
    ask = rng.choice(
        (
            f"Convert to JSON:\n{lines}",
            f"Return these fields as one JSON object.\n\n{lines}",
            f"{lines}\n\nWrite the above as JSON.",
        )
    )
    return ask, json.dumps({k: v for k, v, _ in fields}, ensure_ascii=False)


def _prose_to_json(rng: random.Random) -> tuple[str, str]:
    fields = _fields(rng)
    facts = []
    for k, _, shown in fields:
        name = k.replace("_", " ")
        facts.append(rng.choice((f"the {name} is {shown}", f"{name}: {shown}", f"{name} {shown}")))
    text = passage(rng, 2) + " " + ", ".join(facts) + ". " + passage(rng, 2)
    keys = ", ".join(k for k, _, _ in fields)
    ask = rng.choice(
        (
            f"Extract a JSON object with the keys {keys} from this text.\n\n{text}",
            f"Text: {text}\nKeys: {keys}\nAnswer with JSON only.",
        )
    )
    return ask, json.dumps({k: v for k, v, _ in fields}, ensure_ascii=False)


def _pick_label(rng: random.Random) -> tuple[str, str]:
    labels = list(dict.fromkeys(key_name(rng) for _ in range(rng.randint(2, 5))))
    if rng.random() < 0.5:
        # The label word itself appears in the text.
        answer = rng.choice(labels)
        cue = answer.replace("_", " ")
        text = sentence(rng, include=[cue])
        ask = f"Labels: {', '.join(labels)}\nWhich label does the text mention? Answer with the label only.\nText: {text}"
    else:
        # A keyword -> label rule list in the prompt, like "mentions X -> label".
        cues = list(dict.fromkeys(word(rng) for _ in range(len(labels) * 2)))[: len(labels)]
        labels = labels[: len(cues)]
        i = rng.randrange(len(labels))
        answer = labels[i]
        rules = "\n".join(f"- mentions {c}: {lab}" for c, lab in zip(cues, labels, strict=True))
        text = sentence(rng, include=[cues[i]])
        ask = f"Classify the text with these rules:\n{rules}\n\nText: {text}\nLabel:"
    return ask, answer


def _yes_no(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.7:
        target = word(rng)
        present = rng.random() < 0.5
        text = sentence(rng, include=[target] if present else [])
        present = target in text.lower().replace(".", " ").replace("!", " ").replace("?", " ").split()
        ask = rng.choice(
            (
                f"Does the text mention {target}? Answer yes or no.\nText: {text}",
                f"{text}\n\nIs the word {target} in this text? yes or no",
            )
        )
        return ask, "yes" if present else "no"
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    while a == b:
        b = rng.randint(0, 999)
    return f"Is {a} larger than {b}? Answer yes or no.", "yes" if a > b else "no"


KINDS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy_span": _copy_span,
    "kv_to_json": _kv_to_json,
    "prose_to_json": _prose_to_json,
    "pick_label": _pick_label,
    "yes_no": _yes_no,
}

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer briefly and exactly.",
    "You extract information from text.",
)


def make_exercises(n: int, seed: int) -> list[tuple[str, list[dict[str, str]]]]:
    """`n` (kind, messages) pairs, the kinds in equal rotation; a system turn on about a third."""
    rng = random.Random(f"loraline-exercises-{seed}")
    kinds = list(KINDS)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        user, answer = KINDS[kind](rng)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if rng.random() < 1 / 3:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        out.append((kind, messages))
    return out
