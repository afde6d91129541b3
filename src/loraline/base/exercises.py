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
        ask = (
            f"Labels: {', '.join(labels)}\nWhich label does the "
            f"text mention? Answer with the label only.\nText: {text}"
        )
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
        present = target in _words(text)
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


def _digits(rng: random.Random) -> str:
    return str(rng.randint(10 ** (n := rng.randint(3, 8)) // 10, 10**n - 1))


def _copy_sequence(rng: random.Random) -> tuple[str, str]:
    """Repeat a run of digits, codes and words exactly: every answer token is a copy from the prompt.

    The densest form of the copying skill (a previous-token head feeding an induction head), which a
    small model otherwise learns late; digit strings dominate because ids and numbers are what real
    extraction tasks copy.
    """
    items = [
        _digits(rng) if rng.random() < 0.5 else code_value(rng) if rng.random() < 0.5 else word(rng)
        for _ in range(rng.randint(1, 6))
    ]
    value = rng.choice((" ", ", ", " / ")).join(items)
    ask = rng.choice(
        (
            f"Repeat exactly: {value}",
            f"{passage(rng, 2)}\n\nCopy this line exactly:\n{value}",
            f"Copy the reference {value} from this note. {passage(rng, 2)}",
        )
    )
    return ask, value


def _copy_number(rng: random.Random) -> tuple[str, str]:
    """Repeat a digit string: the simplest copy, on which a small model forms its copying circuit first."""
    value = _digits(rng)
    return rng.choice((f"Repeat exactly: {value}", f"{value}\n\nRepeat the number above.", f"Number: {value}")), value


_MARKERS = ("{k} {v}", "{k} #{v}", "#{v}", "{k} no. {v}", "({k} {v})", "{k}: {v}", "{k} number {v}", "ref {v}")


def _words(text: str) -> list[str]:
    return text.lower().replace(".", " ").replace("!", " ").replace("?", " ").split()


def _message_record(rng: random.Random) -> tuple[str, str]:
    """A message of distractor sentences holding an id, a cue word and maybe a flag phrase -> a JSON
    record that copies the id, labels the cue by rules given in the prompt, and sets the flag.

    The shape of most extraction work (tickets, emails, forms), with random keys, labels and
    vocabulary: the adapter still learns a tenant's own keys, labels and cues.
    """
    id_key, label_key, flag_key = (key_name(rng) for _ in range(3))
    number = _digits(rng)
    labels = list(dict.fromkeys(pseudo_word(rng) for _ in range(rng.randint(2, 6))))
    key_words = set(_words(f"{id_key} {label_key} {flag_key}".replace("_", " ")))
    cues = [c for c in dict.fromkeys(word(rng) for _ in range(len(labels) * 3)) if c not in key_words][: len(labels)]
    labels = labels[: len(cues)]
    i = rng.randrange(len(labels))
    flag_cue = pseudo_word(rng)
    flag = rng.random() < 0.4
    marker = rng.choice(_MARKERS).format(k=id_key.replace("_", " "), v=number)
    # Distractor sentences never mention another rule's cue or the flag cue: the answer is unambiguous.
    banned = ({c for c in cues if c != cues[i]} | {flag_cue}) - key_words

    def clean(include: list[str]) -> str:
        while True:
            text = sentence(rng, include=include)
            if not banned & (set(_words(text)) - {w for inc in include for w in _words(inc)}):
                return text

    body = [clean([]) for _ in range(rng.randint(1, 4))]
    body.insert(rng.randint(0, len(body)), clean([marker]))
    body.insert(rng.randint(0, len(body)), clean([cues[i]]))
    if flag:
        body.insert(rng.randint(0, len(body)), clean([flag_cue]))
    greeting = rng.choice(("", "Hello,\n\n", "Hi there,\n\n", f"Subject: {word(rng)} {word(rng)}\n\n"))
    message = greeting + " ".join(body) + rng.choice(("", f"\n\n{pseudo_word(rng).title()}"))
    rules = "\n".join(f"- mentions {c}: {lab}" for c, lab in zip(cues, labels, strict=True))
    ask = (
        f"Extract a JSON object with the keys {id_key}, {label_key}, {flag_key}.\n"
        f"{label_key} by these rules:\n{rules}\n{flag_key} is true if the message mentions {flag_cue}.\n\n{message}"
    )
    return ask, json.dumps({id_key: number, label_key: labels[i], flag_key: flag})


# kind -> (maker, weight): copying carries the most weight because it is the skill a small model
# learns slowest and extraction tasks need most.
KINDS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy_number": _copy_number,
    "copy_span": _copy_span,
    "copy_sequence": _copy_sequence,
    "message_record": _message_record,
    "kv_to_json": _kv_to_json,
    "prose_to_json": _prose_to_json,
    "pick_label": _pick_label,
    "yes_no": _yes_no,
}
WEIGHTS = {
    "copy_number": 2,
    "copy_span": 2,
    "copy_sequence": 3,
    "message_record": 3,
    "kv_to_json": 1,
    "prose_to_json": 2,
    "pick_label": 1,
    "yes_no": 1,
}

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer briefly and exactly.",
    "You extract information from text.",
)


def make_exercises(n: int, seed: int) -> list[tuple[str, list[dict[str, str]]]]:
    """`n` (kind, messages) pairs, the kinds in a fixed weighted rotation; a system turn on about a third."""
    rng = random.Random(f"loraline-exercises-{seed}")
    kinds = [k for k in KINDS for _ in range(WEIGHTS[k])]
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        user, answer = KINDS[kind](rng)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if rng.random() < 1 / 3:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        out.append((kind, messages))
    return out


def make_copy_drills(n: int, seed: int) -> list[tuple[str, list[dict[str, str]]]]:
    """`n` copy_number exercises from their own stream (the mixed exercises do not change with `n`)."""
    rng = random.Random(f"loraline-copy-drills-{seed}")
    out = []
    for _ in range(n):
        user, answer = _copy_number(rng)
        out.append(("copy_number", [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]))
    return out
