"""`loraline inspect PATH`: what a raw file holds, which shape its rows take, and a `sources:` entry
for rows that fit no shape, checked against the rows themselves before it is suggested. Files of
preference data get a `sources:` entry of their own where their rows need one: rated answers
(UltraFeedback's completions with scores) a `preference:` pick, chosen and rejected answers under
other names (response_j, preferred...) a mapping to chosen and rejected.

Reads every row (streaming, as prepare does): the row count and each key's type and fill rate are
exact. Key paths go one level into objects (`meta.answer`) and into lists of objects
(`instances[].output`), which is where mappings point.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraline.config import PrepareParams, SourceParams
from loraline.prepare.controls import text_cleaner
from loraline.prepare.mapping import SourceSpec, compile_sources, map_rows
from loraline.prepare.readers import RawRow, format_of, list_files, read_rows
from loraline.prepare.schema import Message, Record, Reject
from loraline.prepare.shapes import ShapeOptions, json_type, to_record
from loraline.prepare.split import group_of, normalize

INSTRUCTION_KEYS = (
    "instruction",
    "question",
    "query",
    "prompt",
    "problem",
    "request",
    "input_text",
    "title",
    "q",
    "source",
)
INPUT_KEYS = ("input", "context", "passage", "document", "article", "code")
OUTPUT_KEYS = ("output", "answer", "response", "completion", "solution", "target", "reply", "answers", "a", "label")
ROLE_KEYS = ("role", "from")
CONTENT_KEYS = {"role": "content", "from": "value"}
ROLE_GUESSES = {
    "user": ("user", "human", "customer", "question", "prompter", "usr"),
    "assistant": ("assistant", "gpt", "bot", "model", "agent", "ai", "chatbot", "answer"),
    "system": ("system",),
    "tool": ("tool", "function", "function_response", "observation", "ipython", "tool_response"),
}
# Preference data: answers under other names than chosen/rejected, and the score of a rated answer.
CHOSEN_KEYS = ("chosen", "response_chosen", "chosen_response", "preferred", "better", "winner", "response_j", "good")
REJECTED_KEYS = (
    "rejected",
    "response_rejected",
    "rejected_response",
    "dispreferred",
    "worse",
    "loser",
    "response_k",
    "bad",
)
SCORE_KEYS = ("overall_score", "score", "rating", "reward", "preference_score")
RATED_ANSWER_KEYS = ("response", "completion", "output", "answer", "text", "content")
SAMPLES = 3
MAX_CHARS = 10**9  # inspect shows every row's shape; prepare.max_chars applies in prepare
GROUP_MIN_CHARS = PrepareParams().group_min_chars or 200  # what prepare groups on by default


@dataclass
class KeyStats:
    path: str
    types: Counter = field(default_factory=Counter)
    filled: int = 0  # rows where the value is present, not null and not an empty string


@dataclass
class SourceInspection:
    rel: str
    format: str | None
    rows: int = 0
    unreadable: list[str] = field(default_factory=list)  # file-level rejects (the detail)
    keys: dict[str, KeyStats] = field(default_factory=dict)
    shapes: Counter = field(default_factory=Counter)  # shape name, or "rejected: <reason>"
    role_values: dict[str, Counter] = field(default_factory=dict)  # list path -> role values seen
    suggestion: dict | None = None  # a sources[] entry
    suggestion_fits: tuple[int, int] = (0, 0)  # (rows it maps to a record, rows tried)
    preference: dict | None = None  # a sources[] entry giving preference pairs
    preference_fits: tuple[int, int] = (0, 0)
    samples: list[Record] = field(default_factory=list)  # chat records (a pair's shows its rejected answer too)
    contexts: Counter = field(default_factory=Counter)  # the automatic group key (its hash) -> rows
    context_fields: dict[str, Counter] = field(default_factory=dict)  # a long context-like field -> its values' rows

    @property
    def unknown(self) -> int:
        return sum(n for shape, n in self.shapes.items() if shape.startswith("rejected"))


def inspect_path(
    path: Path, root: Path | None = None, *, clean: Callable[[str], str] | None = None
) -> list[SourceInspection]:
    """Every source at `path` (a file, a save_to_disk folder or a folder of them). `root` is the
    tenant's raw_dir when known, so that suggested globs are relative to it."""
    path = Path(path)
    if path.is_file() or format_of(path) == "hf":
        units = [(path, path.name)]
    else:
        units = list_files(path)
    base = root if root is not None else (path if path.is_dir() and format_of(path) != "hf" else path.parent)
    out = []
    for unit, _ in units:
        try:
            rel = unit.relative_to(base).as_posix()
        except ValueError:
            rel = unit.name
        out.append(_inspect_source(unit, rel, clean))
    return out


def _inspect_source(path: Path, rel: str, clean) -> SourceInspection:
    result = SourceInspection(rel=rel, format=format_of(path))
    options = ShapeOptions(clean=clean)
    first_rows: list[RawRow] = []
    for item in read_rows(path, rel, "inspect", whole_object=True):
        if isinstance(item, Reject):
            if item.row is None:
                result.unreadable.append(item.detail)
            else:
                result.rows += 1
                result.shapes[f"rejected: {item.reason.value}"] += 1
            continue
        result.rows += 1
        _count_keys(result, item.value, item.tabular)
        parsed = to_record(item, "inspect", max_chars=MAX_CHARS, options=options)
        if isinstance(parsed, Reject):
            result.shapes[f"rejected: {parsed.reason.value}"] += 1
        else:
            result.shapes[parsed.record.shape] += 1
            if len(result.samples) < SAMPLES and parsed.record.kind == "chat":
                result.samples.append(parsed.record)
            group = group_of(parsed.record.messages, None, GROUP_MIN_CHARS) if parsed.record.kind == "chat" else None
            if group is not None:
                result.contexts[hash(group)] += 1
        _count_contexts(result, item.value)
        if len(first_rows) < 2000:
            first_rows.append(item)
    if result.unknown and first_rows:
        _suggest(result, first_rows, clean)
    if first_rows:
        _suggest_preference(result, first_rows, clean)
    return result


def _count_keys(result: SourceInspection, value: Any, tabular: bool) -> None:
    if not isinstance(value, dict):
        stats = result.keys.setdefault("(row)", KeyStats("(row)"))
        stats.types[json_type(value)] += 1
        return
    seen: dict[str, Any] = {}
    for key, v in value.items():
        seen[str(key)] = v
        if isinstance(v, dict):
            for sub, sv in v.items():
                seen[f"{key}.{sub}"] = sv
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            for element in v:
                for sub, sv in element.items():
                    seen.setdefault(f"{key}[].{sub}", sv)
                    if sub in ROLE_KEYS and isinstance(sv, str):
                        result.role_values.setdefault(str(key), Counter())[sv] += 1
    for key, v in seen.items():
        stats = result.keys.setdefault(key, KeyStats(key))
        stats.types[json_type(v)] += 1
        if v is not None and v != "" and v != []:
            stats.filled += 1


# -- the suggestion ------------------------------------------------------------------------------


def _count_contexts(result: SourceInspection, value: Any) -> None:
    """Long text in a context-like field (context, passage, document...), counted by value."""
    if not isinstance(value, dict):
        return
    for key in INPUT_KEYS:
        text = value.get(key)
        if isinstance(text, str) and len(text) >= GROUP_MIN_CHARS:
            result.context_fields.setdefault(key, Counter())[hash(normalize(text))] += 1


def shared(counts: Counter) -> tuple[int, int, int]:
    """(groups of two rows or more, rows in them, the largest)."""
    sizes = [n for n in counts.values() if n >= 2]
    return len(sizes), sum(sizes), max(sizes, default=0)


def _suggest(result: SourceInspection, rows: Sequence[RawRow], clean) -> None:
    for candidate in _candidates(result):
        entry = {"path": result.rel, **candidate}
        fits = _fits(entry, rows, clean)
        if fits[0] > result.suggestion_fits[0]:
            result.suggestion, result.suggestion_fits = entry, fits
        if fits[0] == fits[1]:
            break
    if result.suggestion is not None and not result.samples:
        result.samples = _mapped_samples(result.suggestion, rows, clean)
    elif result.suggestion is not None and len(result.samples) < SAMPLES:
        result.samples += _mapped_samples(result.suggestion, rows, clean)[: SAMPLES - len(result.samples)]


def _suggest_preference(result: SourceInspection, rows: Sequence[RawRow], clean) -> None:
    """A sources[] entry giving preference pairs, when the keys look like preference data that needs one."""
    for entry in _preference_candidates(result):
        entry = {"path": result.rel, **entry}
        fits = _fits(entry, rows, clean)
        if fits[0] > result.preference_fits[0]:
            result.preference, result.preference_fits = entry, fits
    if result.preference is not None and len(result.samples) < SAMPLES:
        result.samples += _mapped_samples(result.preference, rows, clean)[: SAMPLES - len(result.samples)]


def _preference_candidates(result: SourceInspection) -> list[dict]:
    """Rated answers in a list (UltraFeedback), then chosen and rejected answers under other names."""
    out: list[dict] = []
    prompt = _pick(result, INSTRUCTION_KEYS)
    context = {"prompt": prompt} if prompt is not None else {}
    lists = sorted({k.split("[]", 1)[0] for k in result.keys if "[]." in k})
    for lst in lists:
        prefix = f"{lst}[]."
        answer = _pick(result, RATED_ANSWER_KEYS, prefix)
        score = _score_key(result, prefix)
        if answer is not None and score is not None and context:
            rule = {"list": lst, "answer": answer[len(prefix) :], "score": score[len(prefix) :]}
            out.append({"columns": context, "preference": rule})
    chosen, rejected = _pick(result, CHOSEN_KEYS), _pick(result, REJECTED_KEYS)
    if chosen is not None and rejected is not None and (chosen, rejected) != ("chosen", "rejected"):
        out.append({"columns": {**context, "chosen": chosen, "rejected": rejected}})
    return out


def _score_key(result: SourceInspection, prefix: str) -> str | None:
    """The numeric field of a list's elements, a score-like name first."""
    numeric = [
        k
        for k, stats in result.keys.items()
        if k.startswith(prefix) and stats.filled and set(stats.types) <= {"number", "null"}
    ]
    named = [k for name in SCORE_KEYS for k in numeric if k[len(prefix) :].lower() == name]
    return (named or numeric or [None])[0]


def _filled_text(result: SourceInspection, path: str) -> bool:
    stats = result.keys.get(path)
    return stats is not None and stats.filled > 0 and set(stats.types) <= {"string", "number", "null"}


def _pick(result: SourceInspection, names: Sequence[str], prefix: str = "") -> str | None:
    lowered = {k.lower(): k for k in result.keys if k.startswith(prefix) and "." not in k[len(prefix) :]}
    for name in names:
        key = lowered.get(prefix + name)
        if key is not None and _filled_text(result, key):
            return key
    return None


def _candidates(result: SourceInspection) -> list[dict]:
    out: list[dict] = []
    lists = sorted({k.split("[]", 1)[0] for k in result.keys if "[]." in k})
    for lst in lists:  # a conversation, or a task with a list of instances
        prefix = f"{lst}[]."
        role_key = next((r for r in ROLE_KEYS if f"{prefix}{r}" in result.keys), None)
        if role_key is not None and f"{prefix}{CONTENT_KEYS[role_key]}" in result.keys:
            canonical = "messages" if role_key == "role" else "conversations"
            entry: dict = {"columns": {canonical: lst}}
            roles = _roles(result.role_values.get(lst, Counter()), canonical)
            if roles:
                entry["roles"] = roles
            out.append(entry)
            continue
        output = _pick(result, OUTPUT_KEYS, prefix)
        if output is None:
            continue
        columns = {}
        instruction = _pick(result, INSTRUCTION_KEYS, prefix) or _pick(result, INSTRUCTION_KEYS)
        if instruction is not None:
            columns["instruction"] = _as_item(instruction, prefix)
            extra = _pick(result, INPUT_KEYS, prefix)
            if extra is not None:
                columns["input"] = _as_item(extra, prefix)
            columns["output"] = _as_item(output, prefix)
            out.append({"explode": lst, "columns": columns})
    instruction = _pick(result, INSTRUCTION_KEYS)
    output = _pick(result, OUTPUT_KEYS) or _nested_answer(result)
    if instruction is not None and output is not None and instruction != output:
        extra = _pick(result, INPUT_KEYS)
        if extra is not None and extra not in (instruction, output):
            if result.keys[extra].filled == result.rows:  # always there: the context reads first
                out.append({"columns": {"instruction": f"{{{extra}}}\n\n{{{instruction}}}", "output": output}})
            else:  # often empty (as in dolly): an optional input, left out where empty
                out.append({"columns": {"instruction": instruction, "input": extra, "output": output}})
        out.append({"columns": {"instruction": instruction, "output": output}})
    return out


def _nested_answer(result: SourceInspection) -> str | None:
    """SQuAD-style answers: {"text": ["..."], ...}: the first text."""
    for name in OUTPUT_KEYS:
        for key, stats in result.keys.items():
            if key.lower() == f"{name}.text" and "array" in stats.types:
                return f"{key}[0]"
    return None


def _as_item(key: str, prefix: str) -> str:
    return f"item.{key[len(prefix) :]}" if key.startswith(prefix) else key


def _roles(values: Counter, canonical: str) -> dict[str, str]:
    known = (
        ("system", "user", "assistant", "tool")
        if canonical == "messages"
        else ("human", "user", "gpt", "assistant", "system", "tool")
    )
    roles = {}
    for value in values:
        if value.strip().lower() in known:
            continue
        guess = next((role for role, names in ROLE_GUESSES.items() if value.strip().lower() in names), None)
        if guess is not None:
            roles[value] = guess
    return roles


def _spec(entry: dict) -> SourceSpec:
    return compile_sources([SourceParams(**entry)])[0]


def _fits(entry: dict, rows: Sequence[RawRow], clean) -> tuple[int, int]:
    try:
        spec = _spec(entry)
    except ValueError:
        return 0, len(rows)
    options = spec.options(clean)
    ok = tried = 0
    for item in _mapped(rows, spec):
        tried += 1
        if not isinstance(item, Reject) and not isinstance(
            to_record(item, "inspect", max_chars=MAX_CHARS, options=options), Reject
        ):
            ok += 1
    return ok, tried


def _mapped(rows: Sequence[RawRow], spec: SourceSpec):
    return map_rows(rows, spec, "inspect")


def _mapped_samples(entry: dict, rows: Sequence[RawRow], clean) -> list[Record]:
    spec = _spec(entry)
    options = spec.options(clean)
    samples = []
    for item in _mapped(rows, spec):
        if isinstance(item, Reject):
            continue
        parsed = to_record(item, "inspect", max_chars=MAX_CHARS, options=options)
        if not isinstance(parsed, Reject):
            samples.append(parsed.record)
        if len(samples) == SAMPLES:
            break
    return samples


def default_cleaner(tokenizer=None) -> Callable[[str], str] | None:
    """prepare's default control-token policy, so inspect shows rows as prepare would read them."""
    from loraline.prepare.render import control_tokens

    controls = control_tokens(tokenizer) if tokenizer is not None else ()
    return text_cleaner(PrepareParams().control_tokens, controls, tokenizer)


__all__ = ["KeyStats", "SourceInspection", "default_cleaner", "inspect_path", "report_text"]


# -- the report ----------------------------------------------------------------------------------


def rendered_with_spans(messages: Sequence[Message], tokenizer=None) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The chat-templated text and the character spans trained on: the base tokenizer's template when
    there is one (exactly what prepare renders), else loraline's ChatML template."""
    if tokenizer is not None:
        from loraline.prepare.render import render

        rendered = render(messages, tokenizer)
        return rendered.text, rendered.spans
    from loraline.modelling.chat import render_chat

    dicts = [{"role": m.role, "content": m.content} for m in messages]
    spans = []
    for i, m in enumerate(messages):
        if m.role == "assistant" and i > 0:
            start = len(render_chat(dicts[:i], add_generation_prompt=True))
            spans.append((start, len(render_chat(dicts[: i + 1]).rstrip())))
    return render_chat(dicts), tuple(spans)


def report_text(results: Sequence[SourceInspection], tokenizer=None, *, color: bool = False) -> str:
    mark = ("\033[1;32m", "\033[0m") if color else ("«", "»")
    lines: list[str] = []
    for r in results:
        lines.append(f"== {r.rel}  (format: {r.format or 'unsupported'}, {r.rows} rows)")
        lines += [f"   unreadable: {d}" for d in r.unreadable]
        if r.keys:
            lines.append("   keys:")
            width = max(len(k) for k in r.keys)
            for key, stats in r.keys.items():
                types = ", ".join(f"{t}" if n == r.rows else f"{t} {n}" for t, n in stats.types.most_common())
                fill = f"{100 * stats.filled / r.rows:5.1f}% filled" if r.rows and key != "(row)" else ""
                lines.append(f"     {key.ljust(width)}  {fill:>13}  {types}")
        if r.shapes:
            lines.append("   shapes: " + ", ".join(f"{s} {n}" for s, n in r.shapes.most_common()))
        lines += _context_lines(r)
        if r.suggestion is not None:
            ok, tried = r.suggestion_fits
            lines.append(
                f"   {r.unknown} rows fit no shape. Suggested entry (fits {ok} of the first {tried} rows);"
                " paste it under tenants.<tenant>: in params.yaml (path is relative to the tenant's raw_dir):"
            )
            lines += [f"     {line}" for line in _yaml_block(r.suggestion).splitlines()]
        elif r.unknown:
            lines.append(
                f"   {r.unknown} rows fit no shape and no mapping could be guessed: write a sources: entry "
                "(docs/data.md)"
            )
        lines += _preference_lines(r)
        for i, record in enumerate(r.samples, start=1):
            lines += _sample_lines(i, record, tokenizer, mark)
    return "\n".join(lines)


def _preference_lines(r: SourceInspection) -> list[str]:
    """What the file holds of preference data, and the entry that makes pairs of it."""
    lines = []
    if r.shapes.get("preference"):
        lines.append(
            f"   {r.shapes['preference']} rows are preference pairs (chosen and rejected answers): "
            "train.objective dpo or orpo trains on them"
        )
    if r.preference is not None:
        ok, tried = r.preference_fits
        lines.append(
            f"   The rows hold preference data. Suggested preference entry (a pair from {ok} of the first {tried} "
            "rows), for train.objective dpo or orpo; paste it under tenants.<tenant>: in params.yaml:"
        )
        lines += [f"     {line}" for line in _yaml_block(r.preference).splitlines()]
    return lines


def _sample_lines(i: int, record: Record, tokenizer, mark: tuple[str, str]) -> list[str]:
    try:
        text, spans = rendered_with_spans(record.messages, tokenizer)
    except ValueError as exc:  # ChatTemplateError: say so, keep inspecting
        return [f"   sample {i}: cannot be rendered: {exc}"]
    kind = "the chosen answer of a preference pair; " if record.rejected else ""
    lines = [f"   sample {i} ({kind}chat template; trained part {mark[0]}marked{mark[1]}):"]
    lines += [f"     | {line}" for line in _marked(text, spans, mark).splitlines()]
    if record.rejected:
        lines.append("     rejected answer:")
        lines += [f"     | {line}" for line in record.rejected.splitlines()]
    return lines


def _yaml_block(entry: dict) -> str:
    import yaml

    return yaml.dump(
        {"sources": [entry]}, Dumper=_quoted_dumper(), sort_keys=False, allow_unicode=True, width=200
    ).rstrip()


def _context_lines(r: SourceInspection) -> list[str]:
    """Whether rows share contexts, and the grouping prepare would use (the split keeps a group together)."""
    lines = []
    groups, rows, largest = shared(r.contexts)
    if groups:
        lines.append(
            f"   shared contexts: {rows} rows in {groups} groups (largest {largest}) share a line of at least "
            f"{GROUP_MIN_CHARS} characters in their first user turn; prepare groups them by it and keeps each "
            "group in one split (prepare.group_min_chars)"
        )
    for key, counts in r.context_fields.items():
        groups, rows, largest = shared(counts)
        if groups:
            lines.append(
                f"   field {key!r} repeats: {rows} rows in {groups} groups (largest {largest}); to group by it, "
                f"add group: {key} to this file's sources entry"
            )
    return lines


def _quoted_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        """Strings holding newlines as double-quoted scalars ("{context}\n\n{question}"): pasteable as is."""

    def text(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    Dumper.add_representer(str, text)
    return Dumper


def _marked(text: str, spans: Sequence[tuple[int, int]], mark: tuple[str, str]) -> str:
    out, pos = [], 0
    for start, end in spans:
        out += [text[pos:start], mark[0], text[start:end], mark[1]]
        pos = end
    out.append(text[pos:])
    return "".join(out)
