"""Where a stage runs its models: `device: auto|cpu|cuda`, resolved by one helper for every stage."""

from __future__ import annotations

import pytest
import torch

from loraline.config import ConfigError, parse_params
from loraline.modelling.device import device_facts, resolve_device


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine where torch sees no CUDA device (whatever this one has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_without_a_gpu_is_the_cpu(no_gpu):
    assert resolve_device("auto", "merge.device") == torch.device("cpu")
    assert device_facts(resolve_device("auto", "merge.device")) == {"device": "cpu"}


def test_cpu_is_the_cpu_on_any_machine():
    assert resolve_device("cpu", "evaluate.device") == torch.device("cpu")


@pytest.mark.parametrize("key", ["merge.device", "export.device", "evaluate.device"])
def test_cuda_without_a_gpu_is_an_error_naming_the_key(no_gpu, key):
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda", key)
    message = str(err.value)
    assert message.startswith(f"{key} is cuda but torch sees no CUDA device")
    assert f"set {key}: auto" in message


def test_an_unknown_setting_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^export\.device is 'gpu'; allowed: auto, cpu, cuda$"):
        resolve_device("gpu", "export.device")


def test_every_model_stage_has_the_setting_defaulting_to_auto():
    params = parse_params({"tenants": {"acme": {"raw_dir": "data/raw/acme"}}})
    assert params.merge.device == params.export.device == params.evaluate.device == params.base.build.device == "auto"


@pytest.mark.cuda
def test_auto_and_cuda_on_a_gpu_are_the_current_cuda_device():
    current = torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("auto", "merge.device") == resolve_device("cuda", "merge.device") == current
    facts = device_facts(current)
    assert facts["device"] == "cuda" and facts["device_name"] == torch.cuda.get_device_name(current)
