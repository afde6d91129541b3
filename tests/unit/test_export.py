"""The export stage on a tiny built base: ONNX with the KV cache in the graph, int8, onnxruntime generation."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "train"))
from train_helpers import make_raw, tiny_build  # noqa: E402

from loraline.export import ExportError, OnnxGenerator, export_onnx  # noqa: E402
from loraline.export.runtime import INT8_FILE, MODEL_FILE  # noqa: E402
from loraline.layout import EXPORT_REPORT  # noqa: E402
from loraline.records import ExportReport  # noqa: E402

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# In the tiny base's own domain, so greedy outputs are real text, not an immediate eos.
PROBES = [
    [{"role": "user", "content": "Ticket 1003 from Dita: the mailbox is down. Please route it."}],
    [{"role": "user", "content": "Ticket 1011 from Lea: the vpn is slow. Please route it."}],
    [{"role": "user", "content": "Hello! Who are you?"}],
]
MAX_NEW = 12


@dataclass(frozen=True)
class Exported:
    base_dir: Path
    out_dir: Path
    report: ExportReport
    root: Path


# CPU results depend on the thread count: one thread keeps them repeatable (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    from loraline.base.stage import build_base
    from loraline.config import BaseParams

    root = tmp_path_factory.mktemp("export")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = make_raw(root / "raw" / "toy", n=60)
        base = build_base(BaseParams(build=tiny_build()), seed=5, raw_dirs=[raw], out_dir=root / "base")
        result = export_onnx(
            model_dir=base.out_dir,
            out_dir=root / "onnx",
            graphs=("fp32", "int8"),
            probes=PROBES,
            max_new_tokens=MAX_NEW,
            tolerance=1e-4,
            device="cpu",
        )
    finally:
        torch.set_num_threads(previous)
    assert result.report_path == result.out_dir / EXPORT_REPORT
    return Exported(base.out_dir, result.out_dir, result.report, root)


@pytest.fixture(scope="module")
def torch_model(exported: Exported):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(exported.base_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def generator(exported: Exported) -> OnnxGenerator:
    return OnnxGenerator(exported.out_dir, threads=1)


def test_folder_is_self_contained(exported: Exported):
    from transformers import AutoConfig, AutoTokenizer

    names = {p.name for p in exported.out_dir.iterdir()}
    assert {
        MODEL_FILE,
        INT8_FILE,
        EXPORT_REPORT,
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert "base_record.json" not in names  # nothing from the base stage's bookkeeping
    assert not [p for p in exported.root.iterdir() if p.name.startswith(".onnx")]  # no temp folders left
    config = json.loads((exported.out_dir / "tokenizer_config.json").read_text())
    assert config.get("chat_template")
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # resolvable by transformers 4 tools too
    assert "local_files_only" not in config  # how the tests loaded it (HF_HUB_OFFLINE=1) is no part of the export
    tok = AutoTokenizer.from_pretrained(str(exported.out_dir))
    base_tok = AutoTokenizer.from_pretrained(str(exported.base_dir))
    assert tok.apply_chat_template(
        PROBES[0], tokenize=False, add_generation_prompt=True
    ) == base_tok.apply_chat_template(PROBES[0], tokenize=False, add_generation_prompt=True)
    assert AutoConfig.from_pretrained(str(exported.out_dir)).num_hidden_layers == 2
    report = json.loads((exported.out_dir / EXPORT_REPORT).read_text())
    assert report["passed"] is True and report["files"][MODEL_FILE]
    assert report["device"] == "cpu"
    assert report["graph"]["inputs"][:2] == ["input_ids", "attention_mask"]
    assert "past_key.1" in report["graph"]["inputs"] and "present.1.value" in report["graph"]["outputs"]


def test_graph_has_dynamic_batch_sequence_and_past(generator: OnnxGenerator):
    inputs = {i.name: i.shape for i in generator.session.get_inputs()}
    outputs = {o.name: o.shape for o in generator.session.get_outputs()}
    assert all(isinstance(d, str) for d in inputs["input_ids"])
    batch, past = inputs["past_key.0"][0], inputs["past_key.0"][2]
    assert isinstance(batch, str) and isinstance(past, str) and past != inputs["input_ids"][1]
    assert isinstance(outputs["present.0.key"][2], str)


def test_fp32_report_parity(exported: Exported):
    fp32 = exported.report.fp32
    assert fp32.max_abs_logit_diff < 1e-4
    assert fp32.decode_max_abs_logit_diff < 1e-4
    assert fp32.greedy_agreement == 1.0 and fp32.next_token_agreement == 1.0
    assert len(fp32.per_probe) == len(PROBES)


@torch.no_grad()
def test_prompt_logits_match_pytorch_batched(generator: OnnxGenerator, torch_model):
    """Independent of the report: batch 2, a length not used at export time."""
    ids = torch.randint(0, torch_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ref = torch_model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    logits, present = generator.forward(ids.numpy(), mask.numpy(), generator.empty_past(2))
    assert np.abs(logits - ref).max() < 1e-4
    assert present[0].shape == (2, generator.kv_heads, 9, generator.head_dim)


@torch.no_grad()
def test_cached_decoding_matches_pytorch_cache(generator: OnnxGenerator, torch_model):
    from transformers import DynamicCache

    from loraline.export.build import _cache_kwarg

    ids = generator.encode(PROBES[1])
    x = torch.tensor([ids])
    cache = DynamicCache(config=torch_model.config)
    key = _cache_kwarg(torch_model)
    out = torch_model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, **{key: cache})
    logits, past = generator.forward(x.numpy(), np.ones_like(x.numpy()), generator.empty_past(1))
    total = len(ids)
    for token in (5, 17, 101, 42, 3):  # arbitrary tokens: the cache must work off the greedy path too
        total += 1
        mask = torch.ones(1, total, dtype=torch.long)
        out = torch_model(input_ids=torch.tensor([[token]]), attention_mask=mask, use_cache=True, **{key: cache})
        logits, past = generator.forward(np.array([[token]]), mask.numpy(), past)
        assert logits.shape[1] == 1 and past[0].shape[2] == total
        assert np.abs(logits[0, -1] - out.logits[0, -1].numpy()).max() < 1e-4


@torch.no_grad()
def test_greedy_matches_transformers_generate(generator: OnnxGenerator, torch_model):
    lengths = []
    for conversation in PROBES:
        ids = generator.encode(conversation)
        x = torch.tensor([ids])
        ref = torch_model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=generator.eos_ids,
            pad_token_id=generator.tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
        got = generator.generate_ids(ids, max_new_tokens=MAX_NEW)
        assert got == ref
        lengths.append(len(got))
        text = generator.generate(conversation, max_new_tokens=MAX_NEW)
        assert text == generator.tokenizer.decode(ref, skip_special_tokens=True)
        assert generator.generate(ids, max_new_tokens=MAX_NEW) == text  # prompt ids work as well as messages
    assert max(lengths) >= 3  # not vacuous: something beyond an immediate eos was compared


def test_generation_reuses_the_cache(generator: OnnxGenerator, monkeypatch):
    seen = []
    forward = generator.forward

    def spy(input_ids, attention_mask, past):
        seen.append((np.asarray(input_ids).shape, past[0].shape[2]))
        return forward(input_ids, attention_mask, past)

    monkeypatch.setattr(generator, "forward", spy)
    ids = generator.encode(PROBES[0])
    new = generator.generate_ids(ids, max_new_tokens=6)
    assert seen[0] == ((1, len(ids)), 0)
    for step, (shape, past_len) in enumerate(seen[1:], start=1):
        assert shape == (1, 1) and past_len == len(ids) + step - 1
    assert len(seen) == len(new)


def test_stops_at_eos(generator: OnnxGenerator):
    for conversation in PROBES:
        new = generator.generate_ids(generator.encode(conversation), max_new_tokens=64)
        if new[-1] in generator.eos_ids:
            assert not set(new[:-1]) & set(generator.eos_ids)
            return
    pytest.skip("no probe reached eos within 64 tokens")


def test_sampling_is_reproducible_under_a_seed(generator: OnnxGenerator):
    ids = generator.encode(PROBES[2])
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95)
    a = generator.generate_ids(ids, seed=7, **kw)
    assert a == generator.generate_ids(ids, seed=7, **kw)
    assert len({tuple(generator.generate_ids(ids, seed=s, **kw)) for s in range(5)}) > 1
    greedy = generator.generate_ids(ids, max_new_tokens=10)
    assert generator.generate_ids(ids, max_new_tokens=10, do_sample=True, top_p=1e-9, seed=3) == greedy
    assert isinstance(generator.generate(PROBES[2], max_new_tokens=5, do_sample=True, seed=1), str)
    with pytest.raises(ValueError):
        generator.generate_ids(ids, do_sample=True, temperature=0.0)


def test_int8_report_and_model(exported: Exported):
    int8 = exported.report.int8
    assert int8.file == INT8_FILE and (exported.out_dir / INT8_FILE).is_file()
    for key in ("max_abs_logit_diff", "decode_max_abs_logit_diff", "greedy_agreement", "next_token_agreement"):
        assert np.isfinite(getattr(int8, key))
    assert 0.0 <= int8.greedy_agreement <= 1.0
    assert int8.max_abs_logit_diff < 5.0  # quantized, not broken
    assert (exported.out_dir / INT8_FILE).stat().st_size < (exported.out_dir / MODEL_FILE).stat().st_size
    q = OnnxGenerator(exported.out_dir, model_file=INT8_FILE, threads=1)
    assert isinstance(q.generate(PROBES[0], max_new_tokens=4), str)


def test_too_tight_tolerance_raises_and_leaves_nothing(exported: Exported):
    out = exported.root / "onnx_tight"
    with pytest.raises(ExportError) as info:
        export_onnx(
            model_dir=exported.base_dir,
            out_dir=out,
            probes=PROBES[:1],
            max_new_tokens=2,
            tolerance=1e-12,
            device="cpu",
        )
    assert isinstance(info.value, ValueError)
    assert info.value.report is not None and info.value.report.passed is False
    assert not out.exists()
    assert not [p for p in exported.root.iterdir() if p.name.startswith(".onnx_tight")]


def test_cuda_without_a_gpu_names_the_key_and_writes_nothing(exported: Exported, tmp_path, monkeypatch):
    from loraline.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^export\.device is cuda but torch sees no CUDA device"):
        export_onnx(model_dir=exported.base_dir, out_dir=tmp_path / "x", probes=PROBES[:1], device="cuda")
    assert not (tmp_path / "x").exists()


def test_left_padded_batch_matches_single_rows(generator: OnnxGenerator):
    """Position ids come from the attention mask, so a left-padded batch decodes like each row alone."""
    rows = [generator.encode(PROBES[0]), generator.encode(PROBES[2])]
    width = max(map(len, rows))
    pad = generator.tokenizer.pad_token_id or 0
    ids = np.array([[pad] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    logits, past = generator.forward(ids, mask, generator.empty_past(2))
    mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    step, _ = generator.forward(np.array([[7], [7]]), mask, past)
    for i, row in enumerate(rows):
        alone, alone_past = generator.forward(np.array([row]), np.ones((1, len(row))), generator.empty_past(1))
        assert np.abs(logits[i, width - len(row) :] - alone[0]).max() < 1e-4
        alone_step, _ = generator.forward(np.array([[7]]), np.ones((1, len(row) + 1)), alone_past)
        assert np.abs(step[i, -1] - alone_step[0, -1]).max() < 1e-4


def test_large_models_use_external_data(exported: Exported, monkeypatch):
    import loraline.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = exported.root / "onnx_external"
    result = export_onnx(
        model_dir=exported.base_dir,
        out_dir=out,
        graphs=("fp32", "int8"),
        probes=PROBES[:1],
        max_new_tokens=4,
        tolerance=1e-4,
        device="cpu",
    )
    assert result.report.graph.external_data is True and (out / "model.onnx.data").is_file()
    assert result.report.int8.external_data is True and (out / "model.int8.onnx.data").is_file()
    assert "model.onnx.data" in result.report.files
    assert result.report.fp32.greedy_agreement == 1.0


def test_random_llama_greedy_agreement_is_not_vacuous(random_llama: Path, tmp_path):
    result = export_onnx(
        model_dir=random_llama,
        out_dir=tmp_path / "onnx",
        probes=PROBES,
        max_new_tokens=24,
        tolerance=1e-4,
        device="cpu",
    )
    fp32 = result.report.fp32
    assert fp32.max_abs_logit_diff < 1e-4 and fp32.decode_max_abs_logit_diff < 1e-4
    assert fp32.greedy_agreement == 1.0
    assert min(p.greedy_tokens for p in fp32.per_probe) >= 10
    generator = OnnxGenerator(result.out_dir, threads=1)
    tokens = generator.generate_ids(generator.encode(PROBES[0]), max_new_tokens=24)
    assert len(set(tokens)) > 3
    assert generator.kv_heads == 2
    config = json.loads((result.out_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"]


@pytest.mark.cuda
def test_export_parity_on_cuda(exported: Exported, random_llama: Path, tmp_path):
    """export.device cuda: the PyTorch reference runs on the GPU (probes batched), the graph is still traced on
    the CPU (the same bytes as the CPU's export), and onnxruntime's answers match the GPU's."""
    result = export_onnx(
        model_dir=exported.base_dir,
        out_dir=tmp_path / "onnx",
        probes=PROBES,
        max_new_tokens=MAX_NEW,
        tolerance=1e-3,
        device="cuda",
    )
    report = json.loads(result.report_path.read_text())
    assert report["passed"] is True and report["device"] == "cuda" and report["device_name"]
    assert report["fp32"]["max_abs_logit_diff"] < 1e-3 and report["fp32"]["decode_max_abs_logit_diff"] < 1e-3
    assert report["fp32"]["greedy_agreement"] == 1.0
    assert report["files"][MODEL_FILE] == exported.report.files[MODEL_FILE]
    assert report["reference_greedy_texts"] == exported.report.reference_greedy_texts
    # Long, varied answers (no early eos): every batched, cached step on the GPU agrees with onnxruntime.
    result = export_onnx(
        model_dir=random_llama,
        out_dir=tmp_path / "random",
        probes=PROBES,
        max_new_tokens=24,
        tolerance=1e-3,
        device="cuda",
    )
    fp32 = result.report.fp32
    assert result.report.device == "cuda" and fp32.greedy_agreement == 1.0
    assert min(p.greedy_tokens for p in fp32.per_probe) >= 10


def test_cli_generate_prints_what_the_generator_returns(exported: Exported, generator: OnnxGenerator, capsys):
    from loraline.cli import main

    messages = [{"role": "user", "content": "colour=blue size=4"}]
    expected = generator.generate(messages, max_new_tokens=12)
    assert (
        main(["generate", "--onnx", str(exported.out_dir), "--prompt", "colour=blue size=4", "--max-new-tokens", "12"])
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    sampled = generator.generate(messages, max_new_tokens=12, do_sample=True, temperature=0.8, seed=3)
    assert (
        main(
            [
                "generate",
                "--onnx",
                str(exported.out_dir),
                "--prompt",
                "colour=blue size=4",
                "--max-new-tokens",
                "12",
                "--sample",
                "--temperature",
                "0.8",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == sampled + "\n"
