"""base.model set: a local folder or a hub id is validated and recorded, never copied or downloaded."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest

from loraline.base.corpus import held_out_docstrings, stdlib_docstrings
from loraline.base.stage import build_base
from loraline.config import BaseParams, ConfigError
from loraline.layout import GENERAL_TEXT
from loraline.modelling.chat import CHAT_TEMPLATE
from loraline.modelling.loading import base_load_kwargs, load_base_tokenizer, resolve_base_model_path
from loraline.provenance import sha256_file

OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _without_template(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_local_folder_is_recorded_not_copied(built, tmp_path):
    _, source = built
    params = BaseParams(model=str(source.out_dir))
    result = build_base(params, seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["base_record.json", GENERAL_TEXT]  # no weights copied
    rec = result.record
    assert rec.source == "local" and rec.model_ref == str(source.out_dir.resolve())
    assert rec.architecture == "LlamaForCausalLM" and rec.model_type == "llama"
    assert rec.parameters == source.record.parameters
    assert rec.chat_template_source == "model"
    assert rec.files["model.safetensors"] == sha256_file(source.out_dir / "model.safetensors")
    assert resolve_base_model_path(result.out_dir) == str(source.out_dir.resolve())
    assert base_load_kwargs(result.out_dir) == {}
    tok = load_base_tokenizer(result.out_dir, params)
    assert tok.chat_template == CHAT_TEMPLATE


def test_a_base_of_your_own_gets_general_text_it_was_not_built_from_here(built, tmp_path):
    """evaluate.general's default sample exists for any base: for one not built here, the same kind of docstrings
    from the first file on (it was not pretrained by loraline, so none of them is set aside)."""
    _, source = built
    result = build_base(BaseParams(model=str(source.out_dir)), seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    texts = [json.loads(line)["text"] for line in (result.out_dir / GENERAL_TEXT).read_text().splitlines()]
    assert texts == held_out_docstrings(0, len(texts)) and len(texts) == result.record.general_text.rows > 100
    assert texts[:20] == stdlib_docstrings(10**9)[:20]
    assert "none of which the build read" in result.record.general_text.source


def test_missing_chat_template_is_a_clear_error(built, tmp_path):
    _, source = built
    folder = _without_template(source.out_dir, tmp_path / "model")
    with pytest.raises(ConfigError, match="base.chat_template"):
        build_base(BaseParams(model=str(folder)), seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_params_chat_template_fills_the_gap(built, tmp_path):
    _, source = built
    folder = _without_template(source.out_dir, tmp_path / "model")
    params = BaseParams(model=str(folder), chat_template=OTHER_TEMPLATE)
    result = build_base(params, seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    assert result.record.chat_template_source == "params"
    tok = load_base_tokenizer(result.out_dir, params)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user] hi\n"


def test_model_template_wins_over_params(built, tmp_path):
    _, source = built
    params = BaseParams(model=str(source.out_dir), chat_template=OTHER_TEMPLATE)
    result = build_base(params, seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    assert load_base_tokenizer(result.out_dir, params).chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("ref", ["./models/does-not-exist", "/no/such/folder/model", "not a model id!", "a/b/c"])
def test_nonexistent_path_names_the_key(ref, tmp_path):
    with pytest.raises(ConfigError, match=r"base\.model") as exc:
        build_base(BaseParams(model=ref), seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    assert ref in str(exc.value)


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="config.json"):
        build_base(BaseParams(model=str(tmp_path / "m")), seed=1, raw_dirs=[], out_dir=tmp_path / "base")


def test_hub_id_not_cached_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    params = BaseParams(model="example-org/tiny-chat-model", revision="v1.0")
    result = build_base(params, seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    rec = result.record
    assert rec.source == "hub" and rec.cached is False and rec.revision == "v1.0"
    assert rec.revision_pinned is False
    assert resolve_base_model_path(result.out_dir) == "example-org/tiny-chat-model"
    assert base_load_kwargs(result.out_dir) == {"revision": "v1.0"}


def test_hub_id_in_local_cache_is_inspected(built, tmp_path, monkeypatch):
    """A model already in the HF cache is checked like a local folder, still with no network."""
    _, source = built
    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--example-org--tiny"
    shutil.copytree(source.out_dir, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("base_record.json"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    result = build_base(BaseParams(model="example-org/tiny"), seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    rec = result.record
    assert rec.cached is True and rec.architecture == "LlamaForCausalLM"
    assert rec.parameters == source.record.parameters and rec.chat_template_source == "model"


def test_a_local_base_s_tokenizer_loads_as_autotokenizer_would_without_its_imports(built, tmp_path):
    """The base stage records the class AutoTokenizer picked; later stages load that class directly when it is the
    generic one, with the same result (vocabulary, specials, template, ids) and no torch in the process."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from loraline.modelling.loading import tokenizer_hash

    _, source = built
    params = BaseParams(model=str(source.out_dir))
    result = build_base(params, seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    assert result.record.tokenizer_class == "TokenizersBackend"
    direct, auto = load_base_tokenizer(result.out_dir, params), AutoTokenizer.from_pretrained(source.out_dir)
    auto.pad_token = auto.pad_token or auto.eos_token
    assert type(direct) is type(auto) and tokenizer_hash(direct) == tokenizer_hash(auto)
    assert (direct.pad_token_id, direct.eos_token_id, direct.bos_token_id, len(direct)) == (
        auto.pad_token_id,
        auto.eos_token_id,
        auto.bos_token_id,
        len(auto),
    )
    chat = [{"role": "user", "content": "Où est ma commande #4411?"}, {"role": "assistant", "content": '{"a": 1}'}]
    assert direct.apply_chat_template(chat, tokenize=True) == auto.apply_chat_template(chat, tokenize=True)
    script = (
        "import sys\nfrom pathlib import Path\nfrom loraline.config import BaseParams\n"
        "from loraline.modelling.loading import load_base_tokenizer\n"
        f"load_base_tokenizer(Path({str(result.out_dir)!r}), BaseParams(model={str(source.out_dir)!r}))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_base_recorded_under_another_transformers_loads_through_autotokenizer(built, tmp_path, monkeypatch):
    _, source = built
    params = BaseParams(model=str(source.out_dir))
    result = build_base(params, seed=1, raw_dirs=[], out_dir=tmp_path / "base")
    record = json.loads((result.out_dir / "base_record.json").read_text())
    record["library_versions"]["transformers"] = "0.0.1"
    (result.out_dir / "base_record.json").write_text(json.dumps(record))
    import transformers

    calls = []
    original = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(a) or original(*a, **k)
    )
    load_base_tokenizer(result.out_dir, params)
    assert calls, "a record from another transformers version must not pick the class itself"
