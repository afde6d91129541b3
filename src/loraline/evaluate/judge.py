"""The LLM judge (`evaluate.judge`): an OpenAI-compatible model says, for each judged test row, which of
two answers is better, the candidate's or the other model's (production's, else the base's).

Protocol. The judged rows are up to `max_rows` test rows, picked by the sha256 of their ids (the same
rows every run, spread over the split whatever its order), kept in test order. For each row the judge
sees the rubric (system message; `rubric`, else DEFAULT_RUBRIC), the row's last user turn, its
reference answer (`with_reference`) and the two answers as A and B, and is asked twice: the candidate's
as A, then as B. Asking both orders cancels the judge's preference for a position: a judge that always
says "A" gives the candidate one win and one loss per row, a win rate of 0.5.

Verdicts. The reply is read as a JSON object with a `verdict` of A, B or tie (inside code fences or
beside other text too), or a reply that is only A, B or tie. Anything else is an invalid verdict:
counted, kept in judgements.jsonl with the reply, never a win or a loss.

    win_rate = (wins + ties / 2) / valid verdicts      (null when no verdict is valid)

with wins, losses and ties counted over both orders. Also reported: how often the first position won
among the decisive verdicts (`position_bias`; 0.5 is none), and the rows whose two verdicts agree
(`consistent_rows`: the same outcome for the candidate in both orders) or not.

Requests are deterministic where the server allows (temperature 0, `seed`) and cached by the whole
request body (model, messages, parameters; never the key) under .cache/judge/<tenant>/, so a re-run
with the same answers sends nothing (modelling/endpoint.py: key handling, rate limit, retries).
metrics.json records the endpoint's host only, never its path, query or credentials.

The evaluate stage judges against the base: it never reads the registry, so what it writes depends on
its inputs alone (evaluate_tenant called with a production model judges against that). At release,
when another version is in production and gate.min_judge_win_rate is set, the candidate is judged
again against that version's answers (loraline.release), and the gate's judge rule decides on that;
the stage's win rate against the base is never taken for one against production.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loraline.config import JudgeParams
from loraline.modelling.endpoint import ChatClient

SETTING = "evaluate.judge.endpoint"
JUDGEMENTS = "judgements.jsonl"  # one row per judged test row, beside metrics.json
METRIC = "judge_win_rate"  # the candidate's, in metrics.json's models; the model judged against has EVEN
# A model's win rate against itself under both orders: the same request twice, one win and one loss (or two ties).
EVEN = 0.5
REPLY_CHARS = 500  # of each reply kept in judgements.jsonl
TEMPERATURE = 0.0

DEFAULT_RUBRIC = (
    "You are an impartial judge. Two assistants answered the same user message. Decide which answer serves the user "
    "better: correct (in agreement with the reference answer when one is given), complete, and no longer than it "
    "needs to be. Judge the content, not the order in which the answers appear, their length or their style. When "
    "both are equally good or equally bad, the verdict is a tie."
)
REPLY_FORMAT = (
    'Which answer is better? Reply with one JSON object and nothing else: {"reason": "<one sentence>", '
    '"verdict": "A" or "B" or "tie"}'
)
VERDICT_WORDS = {"a": "A", "answer a": "A", "b": "B", "answer b": "B", "tie": "tie", "draw": "tie", "equal": "tie"}


@dataclass(frozen=True)
class Pairing:
    """One judged test row: the question (last user turn), its reference, and the two answers."""

    row_id: str
    question: str
    reference: str
    candidate: str
    other: str


@dataclass(frozen=True)
class Opponent:
    """What the candidate is judged against: `role` base or production, and which one (`identity`: the
    base record's sha256, production's registry version and commit, or a model folder's hash)."""

    role: str
    identity: dict[str, str]


@dataclass(frozen=True)
class Comparison:
    """One request: the candidate's position (A or B), the verdict read from the reply (None: invalid)."""

    candidate_as: str
    verdict: str | None
    reply: str

    @property
    def outcome(self) -> str:
        if self.verdict is None:
            return "invalid"
        if self.verdict == "tie":
            return "tie"
        return "win" if self.verdict == self.candidate_as else "loss"


@dataclass(frozen=True)
class Judged:
    block: dict[str, Any]  # metrics.json's `judge`
    rows: list[dict[str, Any]]  # judgements.jsonl
    usage: dict[str, int]  # requests sent, cache hits, retries: this run's, kept out of the outputs

    @property
    def win_rate(self) -> float | None:
        return self.block["win_rate"]


def judge_pairs(
    params: JudgeParams,
    pairs: Sequence[Pairing],
    against: Opponent,
    cache_dir: Path | None,
    sleep: Callable[[float], None] = time.sleep,
) -> Judged:
    """Every pairing judged in both orders; raises modelling.endpoint.EndpointError (naming
    evaluate.judge.endpoint) when the endpoint cannot answer."""
    client = ChatClient.from_params(params.endpoint, SETTING, cache_dir, sleep=sleep)
    rubric = params.rubric or DEFAULT_RUBRIC
    judged: list[tuple[Pairing, list[Comparison]]] = []
    for pair in pairs:
        orders = (("A", pair.candidate, pair.other), ("B", pair.other, pair.candidate))
        comparisons = []
        for candidate_as, a, b in orders:
            reply = client.chat(_request(params, rubric, pair, a, b))
            comparisons.append(Comparison(candidate_as, parse_verdict(reply), reply[:REPLY_CHARS]))
        judged.append((pair, comparisons))
    block = _summary(params, rubric, against, [c for _, cs in judged for c in cs], len(pairs))
    block["consistent_rows"], block["inconsistent_rows"] = _agreement([cs for _, cs in judged])
    rows = [
        {
            "id": pair.row_id,
            "comparisons": [
                {"candidate_as": c.candidate_as, "verdict": c.verdict, "outcome": c.outcome, "reply": c.reply}
                for c in cs
            ],
        }
        for pair, cs in judged
    ]
    return Judged(block, rows, dict(client.counts))


def judged_rows(ids: Sequence[str], max_rows: int | None) -> list[int]:
    """Indexes of the rows to judge: the max_rows whose ids hash lowest, in their order."""
    if max_rows is None or max_rows >= len(ids):
        return list(range(len(ids)))
    ranked = sorted(range(len(ids)), key=lambda i: (hashlib.sha256(ids[i].encode("utf-8")).hexdigest(), i))
    return sorted(ranked[:max_rows])


def pairings(
    rows: Sequence[dict[str, Any]], other: str, max_rows: int | None, other_answers: Sequence[str] | None = None
) -> list[Pairing]:
    """The judged pairings of generations.jsonl rows (id, prompt, reference, predictions): the candidate's
    answer against `other`'s, or against `other_answers` (one per row, e.g. production's measured at release)."""
    picked = judged_rows([r["id"] for r in rows], max_rows)
    answers = other_answers if other_answers is not None else [r["predictions"][other] for r in rows]
    return [
        Pairing(
            rows[i]["id"], rows[i]["prompt"], rows[i]["reference"], rows[i]["predictions"]["candidate"], answers[i]
        )
        for i in picked
    ]


def parse_verdict(reply: str) -> str | None:
    """A, B or tie from a JSON object's `verdict` or a reply that is only the verdict; None otherwise."""
    text = reply.strip()
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            keys = {str(k).strip().lower(): v for k, v in obj.items()}
            if "verdict" in keys:
                return _verdict_word(keys["verdict"])
    return _verdict_word(text)


def _verdict_word(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return VERDICT_WORDS.get(value.strip().strip("`*_\"'[]()<>.: \n").strip().lower())


def _request(params: JudgeParams, rubric: str, pair: Pairing, a: str, b: str) -> dict[str, Any]:
    parts = [f"[User message]\n{pair.question}"]
    if params.with_reference:
        parts.append(f"[Reference answer]\n{pair.reference}")
    parts += [f"[Answer A]\n{a}", f"[Answer B]\n{b}", REPLY_FORMAT]
    messages = [{"role": "system", "content": rubric}, {"role": "user", "content": "\n\n".join(parts)}]
    return {
        "model": params.model,
        "messages": messages,
        "temperature": TEMPERATURE,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
        "n": 1,
    }


def _summary(
    params: JudgeParams, rubric: str, against: Opponent, comparisons: list[Comparison], rows: int
) -> dict[str, Any]:
    outcomes = [c.outcome for c in comparisons]
    wins, losses, ties, invalid = (outcomes.count(o) for o in ("win", "loss", "tie", "invalid"))
    valid = wins + losses + ties
    first = sum(c.verdict == "A" for c in comparisons)
    second = sum(c.verdict == "B" for c in comparisons)
    return {
        "against": against.role,
        "against_model": dict(against.identity),
        "endpoint": endpoint_host(params.endpoint.base_url or ""),
        "model": params.model,
        "rubric_sha256": hashlib.sha256(rubric.encode("utf-8")).hexdigest(),
        "default_rubric": params.rubric is None,
        "with_reference": params.with_reference,
        "temperature": TEMPERATURE,
        "seed": params.seed,
        "max_tokens": params.max_tokens,
        "rows": rows,
        "comparisons": len(comparisons),
        "valid": valid,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "invalid": invalid,
        "win_rate": (wins + ties / 2) / valid if valid else None,
        "position_bias": {
            "first_wins": first,
            "second_wins": second,
            "first_share": first / (first + second) if first + second else None,
        },
    }


def _agreement(per_row: list[list[Comparison]]) -> tuple[int, int]:
    """(rows whose two verdicts give the candidate the same outcome, rows where both are valid and differ)."""
    both = [(a.outcome, b.outcome) for a, b in per_row if a.verdict is not None and b.verdict is not None]
    same = sum(x == y for x, y in both)
    return same, len(both) - same


def endpoint_host(base_url: str) -> str:
    """host[:port] of the endpoint: no scheme, credentials, path or query, any of which may hold a secret."""
    parts = urlsplit(base_url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else ""


def render(block: dict[str, Any]) -> list[str]:
    """report.md's judge section."""
    rate = block["win_rate"]
    bias = block["position_bias"]
    identity = ", ".join(f"{k} `{str(v)[:12]}`" for k, v in block["against_model"].items())
    share = "n/a" if bias["first_share"] is None else f"{bias['first_share']:.2f}"
    return [
        "",
        "## LLM judge",
        "",
        f"The candidate against **{block['against']}** ({identity}), judged by `{block['model']}` at "
        f"`{block['endpoint']}` ({'default' if block['default_rubric'] else 'custom'} rubric "
        f"`{block['rubric_sha256'][:12]}`{', reference shown' if block['with_reference'] else ''}); "
        f"{block['rows']} test rows, each in both orders.",
        "",
        "| win rate | wins | losses | ties | invalid | first position won | consistent rows |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {'n/a' if rate is None else f'{rate:.4f}'} | {block['wins']} | {block['losses']} | {block['ties']} | "
        f"{block['invalid']} | {bias['first_wins']} of {bias['first_wins'] + bias['second_wins']} ({share}) | "
        f"{block['consistent_rows']} of {block['rows']} |",
        "",
        "win rate = (wins + ties / 2) / valid verdicts; an invalid verdict (a reply with no A, B or tie) counts for "
        f"neither side. Every verdict and reply: `{JUDGEMENTS}`.",
    ]
