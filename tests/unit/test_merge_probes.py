"""merge.probes: which test rows become probes, how they are encoded, and the keys that set them (no model: a
small trained tokenizer; the merge stage with tenant probes on the tiny model: test_merge.py)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from loraline.base.tokenizer import train_tokenizer
from loraline.config import ConfigError, parse_params
from loraline.merge.probes import BUILTIN, TEST, TenantDraw, probe_set, ranked_rows
from loraline.modelling.conversation import split_conversation
from loraline.modelling.parity import DEFAULT_PROBES, encode_probe


def _row(i: int, words: int = 3) -> dict:
    question = " ".join(["ticket"] * words) + f" {i}: the vpn is down"
    return {
        "id": f"row-{i:03d}",
        "messages": [
            {"role": "system", "content": "Route tickets."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"network {i}"},
        ],
    }


def _dataset(tmp_path: Path, rows: list[dict], name: str = "prepared") -> Path:
    out = tmp_path / name
    split = lambda rs: datasets.Dataset.from_list(rs) if rs else datasets.Dataset.from_dict({"id": [], "messages": []})  # noqa: E731
    # one shard each: an empty split saved with none cannot be loaded back (prepare saves them so too)
    datasets.DatasetDict({"train": split(rows[:1]), "test": split(rows)}).save_to_disk(
        str(out), num_shards={"train": 1, "test": 1}
    )
    return out


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"ticket {i}: the vpn is down. network {i}. Route tickets." for i in range(200)], 300)


def _draw(folder: Path, count: int, seed: int = 1234, max_prompt_tokens: int = 256) -> TenantDraw:
    return TenantDraw(folder, "acme", seed, count, max_prompt_tokens)


def test_the_draw_is_the_same_on_every_run_and_follows_the_seeded_rank(tok, tmp_path):
    rows = [_row(i) for i in range(30)]
    folder = _dataset(tmp_path, rows)
    first, again = probe_set(tok, DEFAULT_PROBES, _draw(folder, 5)), probe_set(tok, DEFAULT_PROBES, _draw(folder, 5))
    assert first == again
    assert [(p.source, p.id) for p in first.probes[:4]] == [(BUILTIN, str(i)) for i in range(4)]
    drawn = [p.id for p in first.probes[4:]]
    assert [p.source for p in first.probes[4:]] == [TEST] * 5
    assert drawn == [rows[i]["id"] for i in ranked_rows([r["id"] for r in rows], 1234, "acme")[:5]]
    assert drawn != [r["id"] for r in rows[:5]], "the draw is a sample of the split, not its first rows"
    by_id = {r["id"]: r for r in rows}
    for probe in first.probes[4:]:  # the conversation before the last assistant turn, as evaluate asks it
        assert probe.prompt == encode_probe(tok, split_conversation(by_id[probe.id]["messages"])[0])
    other_seed = probe_set(tok, DEFAULT_PROBES, _draw(folder, 5, seed=7))
    assert [p.id for p in other_seed.probes[4:]] != drawn
    facts = first.facts()
    assert (facts["count"], facts[BUILTIN], facts["tenant"]) == (9, 4, 5)
    assert facts["tenant_draw"]["test_rows"] == 30 and facts["tenant_draw"]["seed"] == 1234
    assert facts["prompt_tokens"] == [len(p.prompt) for p in first.probes]


def test_adding_rows_keeps_the_drawn_ones_unless_a_new_row_ranks_before_them(tok, tmp_path):
    rows = [_row(i) for i in range(30)]
    before = [p.id for p in probe_set(tok, [], _draw(_dataset(tmp_path, rows, "before"), 6)).probes]
    added = [_row(i) for i in range(30, 60)]
    after = [
        p.id for p in probe_set(tok, [], _draw(_dataset(tmp_path, added[:15] + rows + added[15:], "after"), 6)).probes
    ]
    new_ids = {r["id"] for r in added}
    kept = [i for i in after if i not in new_ids]
    assert kept == before[: len(kept)] and len(after) == 6
    assert len(kept) < 6, "no added row ranked among the first six: the check above proved nothing"


def test_on_the_cpu_built_in_probes_run_one_at_a_time_and_drawn_ones_batched(tok, tmp_path):
    import torch

    from loraline.merge.probes import CPU_DRAWN_BATCH
    from loraline.modelling.parity import CUDA_PROBE_BATCH

    drawn = probe_set(tok, DEFAULT_PROBES, _draw(_dataset(tmp_path, [_row(i) for i in range(30)]), 10))
    builtin, tenant = drawn.prompts[:4], drawn.prompts[4:]
    assert drawn.batches(torch.device("cpu")) == [(builtin, 1), (tenant, CPU_DRAWN_BATCH)]
    assert drawn.batches(torch.device("cuda")) == [(drawn.prompts, CUDA_PROBE_BATCH)]
    alone = probe_set(tok, DEFAULT_PROBES, None)
    assert alone.batches(torch.device("cpu")) == [(builtin, 1)]  # as the merge ran before merge.probes


def test_zero_draws_nothing_and_reads_no_dataset(tok, tmp_path):
    drawn = probe_set(tok, DEFAULT_PROBES, _draw(tmp_path / "absent", 0))
    assert [p.source for p in drawn.probes] == [BUILTIN] * 4
    assert drawn.facts()["tenant"] == 0 and "tenant_draw" not in drawn.facts()


def test_more_than_the_split_holds_takes_all_of_it(tok, tmp_path):
    rows = [_row(i) for i in range(7)]
    drawn = probe_set(tok, DEFAULT_PROBES[:1], _draw(_dataset(tmp_path, rows), 16))
    assert sorted(p.id for p in drawn.probes if p.source == TEST) == sorted(r["id"] for r in rows)
    assert drawn.facts()["tenant_draw"] | {"requested": 16, "test_rows": 7} == drawn.facts()["tenant_draw"]
    empty = probe_set(tok, DEFAULT_PROBES[:1], _draw(_dataset(tmp_path, [], "empty"), 16))
    assert [p.source for p in empty.probes] == [BUILTIN]


def test_long_prompts_are_skipped_in_rank_order_and_recorded(tok, tmp_path):
    rows = [_row(i, words=3 if i % 2 else 60) for i in range(20)]  # every even row is long
    short = max(len(encode_probe(tok, split_conversation(r["messages"])[0])) for r in rows[1::2])
    drawn = probe_set(tok, [], _draw(_dataset(tmp_path, rows), 4, max_prompt_tokens=short))
    ids = [p.id for p in drawn.probes]
    assert len(ids) == 4 and all(int(i[-3:]) % 2 for i in ids) and all(len(p.prompt) <= short for p in drawn.probes)
    ranked = [rows[i]["id"] for i in ranked_rows([r["id"] for r in rows], 1234, "acme")]
    last = ranked.index(ids[-1])
    assert drawn.skipped_long == [i for i in ranked[:last] if int(i[-3:]) % 2 == 0] and drawn.skipped_long
    assert ids == [i for i in ranked[: last + 1] if i not in drawn.skipped_long]
    assert drawn.facts()["tenant_draw"]["skipped_long"] == drawn.skipped_long


def test_a_missing_dataset_or_test_split_names_merge_probes(tok, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"merge\.probes draws from the prepared dataset, but .*absent does not exist.*"
        r"merge\.probes: 0",
    ):
        probe_set(tok, DEFAULT_PROBES, _draw(tmp_path / "absent", 3))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([_row(1)])}).save_to_disk(str(tmp_path / "no-test"))
    with pytest.raises(ValueError, match=r"no test split for merge\.probes .*\(splits: train\)"):
        probe_set(tok, DEFAULT_PROBES, _draw(tmp_path / "no-test", 3))


def test_a_test_row_without_an_answer_names_the_row(tok, tmp_path):
    row = {"id": "row-bad", "messages": [{"role": "user", "content": "hello"}]}
    with pytest.raises(ValueError, match=r"test row row-bad: a test row has no assistant turn"):
        probe_set(tok, [], _draw(_dataset(tmp_path, [row]), 3))


@pytest.mark.parametrize(
    ("merge", "says"),
    [
        ({"probes": -1}, r"merge\.probes: .*greater than or equal to 0"),
        ({"probes": 1000}, r"merge\.probes: .*less than or equal to 256"),
        ({"probes": "many"}, r"merge\.probes: .*integer"),
        ({"probes": 2.5}, r"merge\.probes: .*integer"),
        ({"probe_max_tokens": 0}, r"merge\.probe_max_tokens: .*greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_key(merge, says):
    with pytest.raises(ConfigError, match=says):
        parse_params({"merge": merge, "tenants": {"acme": {"raw_dir": "data/raw/acme"}}})


def test_the_defaults():
    params = parse_params({"tenants": {"acme": {"raw_dir": "data/raw/acme"}}})
    assert params.merge.probes > 0 and params.merge.probe_max_tokens == 256
