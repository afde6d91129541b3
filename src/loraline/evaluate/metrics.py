"""Task metrics computed from generated answers and their references (pure Python, no model).

Comparison rules, shared by every metric here:

* **JSON answers.** When the reference parses as a JSON object or array, the answer is compared as
  data: both sides are parsed and compared canonically (key order and whitespace do not matter,
  ``1`` equals ``1.0``, ``true`` does not equal ``1``, strings inside the JSON are compared exactly).
  A prediction that does not parse then never matches, however close its text is (a truncated
  ``{"a": 1`` must not score as ``{"a": 1}``). Only surrounding whitespace is tolerated; code fences
  or prose around the JSON make it invalid.
* **Scalar JSON.** When both sides parse as JSON scalars (``42``, ``true``, ``"x"``) they are
  compared canonically as well; otherwise (a reference ``"Paris"`` against a prediction ``Paris``)
  the text rule below applies.
* **Text answers.** SQuAD-style normalization: Unicode NFKC, lower case, punctuation removed
  (every Unicode punctuation category), the English articles a/an/the removed, whitespace collapsed.

Metrics: `exact_match`, `token_f1` (SQuAD token overlap), `rouge_l` (LCS F1 over tokens),
`json_valid`, `json_field_accuracy`; `aggregate` averages them over a test set and
`expects_json` decides from the references whether a tenant's task asks for JSON objects.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = [
    "JSON_OBJECT_SHARE",
    "aggregate",
    "canonical_json",
    "exact_match",
    "expects_json",
    "json_field_accuracy",
    "json_valid",
    "normalize",
    "parse_json",
    "rouge_l",
    "token_f1",
    "tokens",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_MISSING = object()

#: `expects_json` answers True when more than this share of the references are JSON objects.
JSON_OBJECT_SHARE = 0.5


def normalize(text: str) -> str:
    """SQuAD-style normalization: NFKC, lower case, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def parse_json(text: str) -> Any:
    """The parsed JSON value of `text` (surrounding whitespace allowed), or a private sentinel.

    Use `_is_json` / `json_valid` rather than comparing against the sentinel.
    """
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return _MISSING


def _canon(value: Any) -> Any:
    """Recursively normalize parsed JSON: integral floats become ints (1.0 == 1), bools stay bools."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canon(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Stable text form of a parsed JSON value: sorted keys, no spaces, integral floats as ints."""
    return json.dumps(_canon(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _same(a: Any, b: Any) -> bool:
    return canonical_json(a) == canonical_json(b)


def _is_container(value: Any) -> bool:
    return isinstance(value, (dict, list))


def exact_match(pred: str, ref: str) -> bool:
    """True when `pred` answers `ref` exactly under the module's comparison rules."""
    ref_value = parse_json(ref)
    pred_value = parse_json(pred)
    if ref_value is not _MISSING and _is_container(ref_value):
        return pred_value is not _MISSING and _same(pred_value, ref_value)
    if ref_value is not _MISSING and pred_value is not _MISSING:
        return _same(pred_value, ref_value)
    return normalize(pred) == normalize(ref)


def tokens(text: str) -> list[str]:
    """Tokens for overlap metrics: normalized words; a JSON container is first put in canonical form."""
    value = parse_json(text)
    if value is not _MISSING and _is_container(value):
        text = canonical_json(value)
    return normalize(text).split()


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1 (bag of normalized tokens). Both empty: 1.0; one empty: 0.0."""
    p, r = tokens(pred), tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1: longest common token subsequence, as F1 of its precision and recall.

    Same tokens as `token_f1` (order matters here). Both empty: 1.0; one empty: 0.0.
    """
    p, r = tokens(pred), tokens(ref)
    if not p or not r:
        return float(p == r)
    lcs = _lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def json_valid(pred: str, *, object_only: bool = False) -> bool:
    """True when `pred` (surrounding whitespace allowed) parses as JSON; as a JSON object with `object_only`."""
    value = parse_json(pred)
    if value is _MISSING:
        return False
    return isinstance(value, dict) if object_only else True


def json_field_accuracy(pred: str, ref: str) -> float:
    """Share of the reference object's keys whose value the prediction matches (canonical equality).

    0.0 when `pred` is not a JSON object; extra keys in `pred` are not penalized. An empty reference
    object scores 1.0 against any JSON object. Raises ValueError when `ref` is not a JSON object.
    """
    ref_value = parse_json(ref)
    if not isinstance(ref_value, dict):
        raise ValueError(f"json_field_accuracy needs a JSON object reference, got {ref[:80]!r}")
    pred_value = parse_json(pred)
    if not isinstance(pred_value, dict):
        return 0.0
    if not ref_value:
        return 1.0
    hits = sum(1 for k, v in ref_value.items() if k in pred_value and _same(pred_value[k], v))
    return hits / len(ref_value)


def per_field_accuracy(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """For each key of the JSON-object references (first-seen order): the share of the rows whose
    reference has that key where the prediction has the same value. Shows which fields a model gets
    right, which one number over all fields hides ({} when no reference is a JSON object)."""
    hits: dict[str, int] = {}
    seen: dict[str, int] = {}
    for pred, ref in zip(preds, refs, strict=True):
        ref_value = parse_json(ref)
        if not isinstance(ref_value, dict):
            continue
        pred_value = parse_json(pred)
        pred_value = pred_value if isinstance(pred_value, dict) else {}
        for key, value in ref_value.items():
            seen[key] = seen.get(key, 0) + 1
            hits[key] = hits.get(key, 0) + (key in pred_value and _same(pred_value[key], value))
    return {key: hits[key] / n for key, n in seen.items()}


def expects_json(refs: Sequence[str], share: float = JSON_OBJECT_SHARE) -> bool:
    """True when more than `share` of the references parse as JSON objects (False for no references)."""
    if not refs:
        return False
    objects = sum(1 for r in refs if isinstance(parse_json(r), dict))
    return objects / len(refs) > share


def aggregate(preds: Sequence[str], refs: Sequence[str], expects_json: bool) -> dict[str, float]:
    """Means over a test set: exact_match, token_f1, rouge_l; with `expects_json` also json_valid
    (share of predictions that are JSON objects) and json_field_accuracy (over the rows whose
    reference is a JSON object; NaN when none is). Keys come in that fixed order.

    Raises ValueError for sequences of different lengths or no rows (a mean of nothing is no evidence).
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not preds:
        raise ValueError("no rows to evaluate")
    n = len(preds)
    out = {
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs)) / n,
        "token_f1": math.fsum(token_f1(p, r) for p, r in zip(preds, refs)) / n,
        "rouge_l": math.fsum(rouge_l(p, r) for p, r in zip(preds, refs)) / n,
    }
    if expects_json:
        out["json_valid"] = sum(json_valid(p, object_only=True) for p in preds) / n
        scores = [json_field_accuracy(p, r) for p, r in zip(preds, refs) if isinstance(parse_json(r), dict)]
        out["json_field_accuracy"] = math.fsum(scores) / len(scores) if scores else math.nan
    return out
