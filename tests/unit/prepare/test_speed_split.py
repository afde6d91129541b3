"""split.normalize collapses whitespace with str.split(); it must equal the regex it replaced."""

from __future__ import annotations

import random
import re
import sys
import unicodedata

from loraline.prepare.split import normalize

WHITESPACE = re.compile(r"\s+")


def test_str_split_whitespace_is_the_regex_whitespace():
    differ = [hex(c) for c in range(sys.maxunicode + 1) if bool(WHITESPACE.match(chr(c))) != chr(c).isspace()]
    assert differ == []


def test_normalize_equals_the_regex_version():
    rng = random.Random(0)
    alphabet = [
        "a",
        "B",
        "1",
        " ",
        "\t",
        "\n",
        "\r",
        "\x0b",
        "\x0c",
        "\x1c",
        "\x85",
        "\xa0",
        "\u2003",
        "\u3000",
        "\u200b",
        "\ufeff",
        "ｆ",
        "ﬁ",
        "é",
        "e\u0301",
        "①",
        "\u2028",
    ]
    for _ in range(5000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        assert normalize(text) == WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip(), repr(text)
