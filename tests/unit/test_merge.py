"""The merge stage on a tiny built base and a tiny nf4 adapter (a few seconds on 2 CPU cores)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "train"))
from train_helpers import make_raw, tiny_build, tiny_train  # noqa: E402

from loraline.config import BaseParams, MergeParams, Params, PrepareParams, TenantParams  # noqa: E402
from loraline.layout import MERGE_REPORT  # noqa: E402
from loraline.merge import DEFAULT_PROBES, MergeError, merge_adapter  # noqa: E402
from loraline.records import QuantizedGap  # noqa: E402


@dataclass(frozen=True)
class Trained:
    base_params: BaseParams
    base_dir: Path
    adapter_dir: Path
    root: Path

    def kwargs(self) -> dict:
        # device cpu: these tests pin the CPU's numbers on any machine (test_merge_on_cuda runs the GPU).
        return {
            "base_dir": self.base_dir,
            "base_params": self.base_params,
            "adapter_dir": self.adapter_dir,
            "device": "cpu",
        }


# CPU results depend on the thread count: one thread keeps them repeatable (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    import loraline.train.stage as stage
    from loraline.base.stage import build_base
    from loraline.modelling.loading import load_base_tokenizer
    from loraline.prepare.stage import prepare_tenant

    root = tmp_path_factory.mktemp("merge")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = make_raw(root / "raw" / "toy", n=60)
        base_params = BaseParams(build=tiny_build())  # 150 steps: greedy outputs are not all blanks
        base = build_base(base_params, seed=5, raw_dirs=[raw], out_dir=root / "base")
        tok = load_base_tokenizer(base.out_dir, base_params)
        prepared = prepare_tenant(
            TenantParams(name="toy", raw_dir=raw),
            PrepareParams(),
            tok,
            out_dir=root / "prepared",
            rejected_path=root / "rejected.jsonl",
            stats_path=root / "stats.json",
        )
        params = tiny_train(
            quantization="nf4", max_steps=8, grad_accum=1, eval_every=8, save_every=8, learning_rate=1e-2
        )
        with mock.patch.object(stage, "pick_device", return_value=torch.device("cpu")):
            stage.train_adapter(
                params,
                base_dir=base.out_dir,
                base_params=base_params,
                dataset_dir=prepared.dataset_dir,
                out_dir=root / "adapter",
                checkpoint_dir=root / "ckpt",
            )
    finally:
        torch.set_num_threads(previous)
    return Trained(base_params, base.out_dir, root / "adapter", root)


@pytest.fixture(scope="module")
def merged(trained: Trained):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return merge_adapter(out_dir=trained.root / "merged", tolerance=1e-4, max_new_tokens=12, **trained.kwargs())
    finally:
        torch.set_num_threads(previous)


def test_merged_folder_loads_with_plain_transformers(trained: Trained, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merged.out_dir
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        MERGE_REPORT,
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("adapter_*")), "a merged model carries no adapter files"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "im_start" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())

    # The standalone model reproduces base + adapter (unmerged, fp32) to 1e-4.
    base = AutoModelForCausalLM.from_pretrained(trained.base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(trained.adapter_dir)).eval()
    text = tok.apply_chat_template(DEFAULT_PROBES[1], tokenize=False, add_generation_prompt=True)
    x = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model(input_ids=x).logits
        b = peft_model(input_ids=x).logits
        plain_base = AutoModelForCausalLM.from_pretrained(trained.base_dir, dtype=torch.float32)(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - plain_base).abs().max().item() > 1e-3, "the adapter changed nothing: the test proves nothing"


def test_report(merged):
    report = json.loads(merged.report_path.read_text())
    assert report == json.loads(json.dumps(merged.report.to_json()))
    assert report["passed"] is True and merged.passed
    assert report["dtype"] == "float32" and report["tolerance"] == 1e-4
    assert report["device"] == "cpu" and "device_name" not in report
    m = report["merged_vs_unmerged"]
    assert m["max_abs_logit_diff"] < 1e-4
    assert m["greedy_agreement"] == 1.0
    assert len(m["per_probe"]) == len(DEFAULT_PROBES)
    assert any(t.strip() for t in m["merged_greedy_texts"]), "degenerate greedy outputs would make agreement vacuous"
    gap = report["vs_4bit"]
    assert gap["quantization"]["type"] == "nf4" and gap["quantization"]["compute_dtype"] == "float32"
    assert gap["max_abs_logit_diff"] > 0
    assert 0 <= gap["greedy_agreement"] <= 1
    assert report["reload"]["max_abs_logit_diff"] <= 1e-5 and report["reload"]["loaded_dtype"] == "float32"
    assert set(report["adapter"]["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert report["adapter"]["quantization"] == "nf4"
    assert len(report["base"]["sha256"]) == 64
    assert len(report["code"]["sha256"]) == 64 and "code_revision" not in report and "wall_s" not in report
    assert "model.safetensors" in report["files"]


def test_tolerance_exceeded_raises_and_writes_nothing(trained: Trained, merged):
    out = trained.root / "too-strict"
    with pytest.raises(MergeError) as info:
        merge_adapter(
            out_dir=out,
            tolerance=1e-12,
            probes=DEFAULT_PROBES[:1],
            max_new_tokens=2,
            quantized_reference=False,
            **trained.kwargs(),
        )
    assert isinstance(info.value, ValueError)
    assert "tolerance" in str(info.value) and info.value.report.merged_vs_unmerged.max_abs_logit_diff > 1e-12
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".too-strict")]


def test_rerun_replaces(trained: Trained, merged):
    out = trained.root / "rerun"
    probes = [[{"role": "user", "content": "ping"}]]
    quick = dict(tolerance=1e-4, probes=probes, quantized_reference=False, check_reload=False, **trained.kwargs())
    first = merge_adapter(out_dir=out, max_new_tokens=2, **quick)
    (out / "stale.txt").write_text("left over")
    second = merge_adapter(out_dir=out, max_new_tokens=3, **quick)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / MERGE_REPORT).read_text())["max_new_tokens"] == 3
    assert first.report.files["model.safetensors"] == second.report.files["model.safetensors"]
    assert second.report.vs_4bit == QuantizedGap(skipped="quantized_reference=False")
    with pytest.raises(MergeError):  # a failing re-run leaves no stale merge behind
        merge_adapter(out_dir=out, max_new_tokens=2, **{**quick, "tolerance": 1e-12})
    assert not out.exists()


def test_bad_arguments(trained: Trained, tmp_path):
    with pytest.raises(MergeError, match="dtype"):
        merge_adapter(out_dir=tmp_path / "x", dtype="int8", tolerance=1e-3, **trained.kwargs())
    with pytest.raises(MergeError, match="not a trained adapter"):
        merge_adapter(
            base_dir=trained.base_dir,
            base_params=trained.base_params,
            adapter_dir=tmp_path,
            out_dir=tmp_path / "x",
            tolerance=1e-3,
        )
    assert not (tmp_path / "x").exists()


def test_cuda_without_a_gpu_names_the_key_and_writes_nothing(trained: Trained, tmp_path, monkeypatch):
    from loraline.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^merge\.device is cuda but torch sees no CUDA device"):
        merge_adapter(out_dir=tmp_path / "x", tolerance=1e-3, **{**trained.kwargs(), "device": "cuda"})
    assert not (tmp_path / "x").exists()


def test_bfloat16_merge_needs_a_looser_tolerance(trained: Trained, tmp_path):
    probes = DEFAULT_PROBES[:2]
    kwargs = dict(dtype="bfloat16", probes=probes, max_new_tokens=4, quantized_reference=False, **trained.kwargs())
    with pytest.raises(MergeError, match="bfloat16"):
        merge_adapter(out_dir=tmp_path / "strict", tolerance=1e-4, **kwargs)
    result = merge_adapter(out_dir=tmp_path / "bf16", tolerance=0.5, **kwargs)
    assert result.report.dtype == "bfloat16" and result.report.reload.loaded_dtype == "bfloat16"
    assert 1e-4 < result.report.merged_vs_unmerged.max_abs_logit_diff <= 0.5


_LOAD_AND_SAVE = """
import sys
from transformers import AutoTokenizer
from loraline.modelling.chat import save_tokenizer
save_tokenizer(AutoTokenizer.from_pretrained(sys.argv[1]), sys.argv[2], sys.argv[1])
"""


def test_a_saved_tokenizer_is_the_same_bytes_with_or_without_offline_mode(tmp_path):
    """merge and export save the tokenizer they loaded (save_tokenizer); transformers records how it was
    loaded (HF_HUB_OFFLINE=1 forces local_files_only=True, read once at import), and those keys must not
    reach the output. One process per setting, since the setting is read at import time."""
    import subprocess

    from loraline.base.tokenizer import train_tokenizer

    train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, 300).save_pretrained(tmp_path / "source")
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    settings = {
        "online": clean,
        "offline": {**clean, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        "other-home": {**clean, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")},
    }
    for name, env in settings.items():
        subprocess.run(
            [sys.executable, "-c", _LOAD_AND_SAVE, str(tmp_path / "source"), str(tmp_path / name)],
            env=env,
            check=True,
            capture_output=True,
        )
    online = {f.name: f.read_bytes() for f in (tmp_path / "online").iterdir()}
    assert "tokenizer_config.json" in online and "tokenizer.json" in online
    for name in ("offline", "other-home"):
        assert {f.name: f.read_bytes() for f in (tmp_path / name).iterdir()} == online, name
    config = json.loads(online["tokenizer_config.json"])
    assert not {"local_files_only", "is_local"} & set(config), config


def test_the_merged_tokenizer_records_nothing_of_how_it_was_loaded(merged):
    config = json.loads((merged.out_dir / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(config), config


def test_tenant_probes_join_the_checks_and_the_reference_answers(trained: Trained, merged, tmp_path):
    """merge.probes' rows run through every check the built-in probes do, and their reference answers are
    recorded with the row ids they come from, the same on every run."""
    import datasets

    from loraline.layout import PREPARED_DATASET
    from loraline.merge.probes import TenantDraw

    dataset = trained.root / "prepared" / PREPARED_DATASET
    test_ids = set(datasets.load_from_disk(str(dataset))["test"]["id"])
    quick = dict(
        tolerance=1e-4,
        probes=DEFAULT_PROBES[:2],
        tenant_probes=TenantDraw(dataset, "toy", 1234, 3, 256),
        max_new_tokens=6,
        quantized_reference=False,
        **trained.kwargs(),
    )
    first, second = merge_adapter(out_dir=tmp_path / "a", **quick), merge_adapter(out_dir=tmp_path / "b", **quick)
    report = json.loads(first.report_path.read_text())
    ref = report["probe_reference"]
    a, b = first.report, second.report
    assert a.probe_reference == b.probe_reference and a.probes == b.probes
    assert [o["source"] for o in ref["sources"]] == ["builtin", "builtin", "test", "test", "test"]
    assert [o["id"] for o in ref["sources"][:2]] == ["0", "1"] and {o["id"] for o in ref["sources"][2:]} <= test_ids
    assert ref["prompts"][:2] == merged.report.probe_reference.prompts[:2]
    assert report["probes"]["tenant"] == 3 and report["probes"]["tenant_draw"]["test_rows"] == len(test_ids)
    assert len(ref["texts"]) == len(ref["greedy"]) == 5 and any(t.strip() for t in ref["texts"][2:])
    checked = report["merged_vs_unmerged"]
    assert (
        len(checked["per_probe"]) == 5 and checked["max_abs_logit_diff"] < 1e-4 and checked["greedy_agreement"] == 1.0
    )
    assert report["reload"]["max_abs_logit_diff"] <= 1e-5


@pytest.fixture
def merge_project(trained: Trained, tmp_path, monkeypatch) -> Path:
    """A project folder where `loraline merge --tenant toy` finds the trained adapter (cwd)."""
    import shutil

    import yaml

    shutil.copytree(trained.adapter_dir, tmp_path / "models" / "adapters" / "toy")
    shutil.copytree(trained.root / "raw" / "toy", tmp_path / "data" / "raw" / "toy")
    shutil.copytree(trained.root / "prepared", tmp_path / "data" / "prepared" / "toy")  # merge.probes draws from it
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "tenants": {"toy": {"raw_dir": "data/raw/toy"}},
                "merge": {"max_new_tokens": 2, "quantized_reference": False, "check_reload": False, "device": "cpu"},
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _merge_cli(trained: Trained) -> int:
    from loraline.cli import main

    return main(["merge", "--tenant", "toy", "--base", str(trained.base_dir)])


def test_the_stage_records_its_device_in_the_report_and_the_timing(trained: Trained, merge_project: Path, capsys):
    assert _merge_cli(trained) == 0
    report = json.loads((merge_project / "reports" / "toy" / MERGE_REPORT).read_text())
    assert report["device"] == "cpu"
    drawn, draw = report["probes"]["tenant"], report["probes"]["tenant_draw"]  # from data/prepared/toy, top-level seed
    assert (
        drawn == min(MergeParams().probes, draw["test_rows"]) > 0
        and draw["seed"] == Params.model_fields["seed"].default
    )
    assert (
        f"on {len(DEFAULT_PROBES) + drawn} probes ({len(DEFAULT_PROBES)} built-in, {drawn} from the test split)"
        in capsys.readouterr().out
    )
    timing = json.loads((merge_project / "reports" / "timing" / "merge@toy.json").read_text())
    assert timing["device"] == "cpu" and "device_name" not in timing and timing["wall_s"] > 0


@pytest.mark.cuda
def test_merge_on_cuda(trained: Trained, merged, tmp_path):
    """merge.device cuda: base + adapter, the merge, the probes, the 4-bit reference (bitsandbytes' CUDA kernels,
    bfloat16 as training on a GPU) and the reload check on the GPU; the weights are written from the CPU at
    float32, within float error of the CPU's merge, and the probes answer as they do on the CPU."""
    from safetensors.torch import load_file

    result = merge_adapter(
        out_dir=tmp_path / "cuda", tolerance=1e-4, max_new_tokens=12, **{**trained.kwargs(), "device": "cuda"}
    )
    report = json.loads(result.report_path.read_text())
    assert report["passed"] is True and report["device"] == "cuda" and report["device_name"]
    assert report["merged_vs_unmerged"]["max_abs_logit_diff"] < 1e-4
    assert report["merged_vs_unmerged"]["greedy_agreement"] == 1.0
    gap = report["vs_4bit"]
    assert gap["quantization"]["compute_dtype"] == "bfloat16" and 0 < gap["max_abs_logit_diff"] < 10
    assert report["reload"]["max_abs_logit_diff"] <= 1e-5 and report["reload"]["loaded_dtype"] == "float32"
    assert report["probe_reference"]["greedy"] == merged.report.probe_reference.greedy
    on_gpu, on_cpu = load_file(result.out_dir / "model.safetensors"), load_file(merged.out_dir / "model.safetensors")
    assert on_gpu.keys() == on_cpu.keys()
    for name, weight in on_gpu.items():
        assert weight.dtype == torch.float32 and (weight - on_cpu[name]).abs().max().item() < 1e-5, name


def test_unwritable_timing_is_one_warning_and_the_stage_succeeds(trained: Trained, merge_project: Path, capsys):
    (merge_project / "reports").mkdir()
    (merge_project / "reports" / "timing").write_text("a file where the timing folder should be")
    assert _merge_cli(trained) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loraline")]
    assert err == [
        "loraline: warning: run timing not recorded: cannot write reports/timing/merge@toy.json: "
        "reports/timing is a file, not a folder (the stage's outputs are complete)"
    ]
    assert (merge_project / "models" / "merged" / "toy" / MERGE_REPORT).is_file()
    assert json.loads((merge_project / "reports" / "toy" / "metrics" / "merge.json").read_text())["passed"] is True
    assert (merge_project / "reports" / "toy" / MERGE_REPORT).read_bytes() == (
        merge_project / "models" / "merged" / "toy" / MERGE_REPORT
    ).read_bytes()


def test_an_output_that_cannot_be_written_is_one_error_line_and_no_temp_file(
    trained: Trained, merge_project: Path, capsys, monkeypatch
):
    import errno

    from loraline import io

    real_replace = os.replace

    def replace(src, dst):  # the disk fills up as the metrics file lands
        if str(dst).endswith("metrics/merge.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    assert _merge_cli(trained) == 1
    err = capsys.readouterr().err
    assert "loraline merge: error: cannot write reports/toy/metrics/merge.json: No space left on device\n" in err
    assert "Traceback" not in err
    assert list((merge_project / "reports" / "toy" / "metrics").iterdir()) == []  # no .merge.json.tmp-* left
