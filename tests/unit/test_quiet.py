"""loraline/quiet.py: the listed messages are dropped at their source, everything else still shows."""

from __future__ import annotations

import logging
import warnings

import pytest

from loraline import quiet


def test_each_listed_log_message_is_dropped_and_its_neighbours_kept(caplog):
    quiet.install()
    quiet.install()  # twice: one filter per logger still
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(isinstance(f, quiet._DropMessages) for f in log.filters) == 1
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "trust")
        log.warning("Failed to load the CUDA library")  # another message of the same logger
        logging.getLogger("torchao").warning("Failed to load /x/site-packages/torchao/_C_cutlass_90a.abi3.so: nope")
        logging.getLogger("torchao").warning("Failed to quantize layer 3")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile", "<enum 'KernelPreference'>"
        )
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load the CUDA library",
        "Failed to quantize layer 3",
    ]


def test_a_listed_warning_is_dropped_only_from_its_module_and_category():
    quiet.install()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()  # in front of "always", as the conftest fixture puts them in front of pytest's
        warnings.warn_explicit(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            "modeling_utils.py",
            1,
            module="transformers.modeling_utils",
        )
        warnings.warn_explicit(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            "ours.py",
            1,
            module="loraline.train.stage",
        )  # ours: must show
        warnings.warn_explicit(
            "`is_gradient_checkpointing` is deprecated",
            UserWarning,
            "modeling_utils.py",
            2,
            module="transformers.modeling_utils",
        )  # another category: must show
    assert [(str(w.message)[:30], w.category) for w in seen] == [
        ("`is_gradient_checkpointing` is", FutureWarning),
        ("`is_gradient_checkpointing` is", UserWarning),
    ]


@pytest.mark.parametrize("noise", quiet.NOISE, ids=lambda n: n.source)
def test_every_entry_says_why_and_is_narrow(noise):
    assert noise.kind in ("log", "warning") and len(noise.why) > 40
    assert noise.message and not noise.message.startswith((".*", "^.*"))  # names a message, never "anything"
    assert noise.kind == "log" or noise.category is not Warning  # a warning names its category
