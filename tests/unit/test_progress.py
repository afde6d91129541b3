"""Progress bars: redrawn in place on a terminal, one line every few seconds in a log (loraline.progress)."""

from __future__ import annotations

import io
import sys

import pytest

from loraline import progress
from loraline.flows.orchestrate import _run_streaming


def _drawn(monkeypatch, mode: str | None, steps: int = 200) -> str:
    if mode is None:
        monkeypatch.delenv(progress.ENV, raising=False)
    else:
        monkeypatch.setenv(progress.ENV, mode)
    out = io.StringIO()
    bar = progress.progress_bar(total=steps, desc="train", unit="step", file=out, mininterval=0)
    for _ in range(steps):
        bar.set_postfix(loss="1.0", refresh=False)
        bar.update(1)
    bar.close()
    return out.getvalue()


def test_a_log_gets_a_few_whole_lines(monkeypatch):
    text = _drawn(monkeypatch, "lines")
    assert "\r" not in text
    lines = text.splitlines()
    assert text.endswith("\n") and all(line.strip() for line in lines)
    # 200 quick steps: the first state and the last, not one line per step
    assert 2 <= len(lines) <= 4, lines
    assert "200/200" in lines[-1] and "train" in lines[-1]


def test_a_terminal_gets_a_bar_redrawn_in_place(monkeypatch):
    text = _drawn(monkeypatch, "bar")
    assert text.count("\r") > 10 and "200/200" in text


def test_without_the_setting_a_stream_that_is_not_a_terminal_gets_lines(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert "\r" not in _drawn(monkeypatch, None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert "\r" in _drawn(monkeypatch, None)


@pytest.mark.parametrize("terminal, expected", [(True, "bar"), (False, "lines")])
def test_stages_started_by_loraline_run_follow_its_stderr(monkeypatch, tmp_path, terminal, expected):
    """The stage processes write to a pipe loraline run passes through: they draw as its own stderr would."""
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal, raising=False)
    code, tail, _, _ = _run_streaming(
        [sys.executable, "-c", f"import os; print(os.environ['{progress.ENV}'])"], tmp_path, None, None
    )
    assert code == 0 and tail == [expected]


@pytest.mark.parametrize("mode, hub_bars", [("lines", "1"), ("bar", None)])
def test_in_a_log_the_hugging_face_bars_are_off_before_any_stage_imports_them(tmp_path, mode, hub_bars):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"} | {progress.ENV: mode}
    out = subprocess.run(
        [sys.executable, "-c", "import os, loraline; print(os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == str(hub_bars)
