"""Progress bars a person can follow on a terminal and in a log file.

On a terminal a tqdm bar redraws itself in place. Written anywhere else (CI, `make run > log`) the same
bar is thousands of carriage-return updates in one line of the file: a training stage wrote hundreds of
KB of them. There each bar prints instead one plain line every LINE_SECONDS, and its last state.

Which of the two: LORALINE_PROGRESS=bar|lines when set, else whether stderr is a terminal.
`loraline run` sets it for the stage processes it starts (their stderr is the pipe it passes through
to its own), from its own stderr: a person at a terminal sees bars, a log file gets lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

ENV = "LORALINE_PROGRESS"
LINE_SECONDS = 10.0


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs) that redraws in place on a terminal and writes a line every LINE_SECONDS elsewhere."""
    from tqdm.auto import tqdm  # here, not at the top: `import loraline` (every CLI command) imports this module

    if lines_wanted():
        stream = kwargs.get("file") or sys.stderr
        kwargs.update(
            file=_OneLinePerUpdate(stream),
            mininterval=max(kwargs.get("mininterval", 0), LINE_SECONDS),
            maxinterval=max(kwargs.get("maxinterval", 0), LINE_SECONDS),
            ascii=True,
            ncols=100,
            dynamic_ncols=False,
        )
    return tqdm(iterable, **kwargs)


def hub_bars_off_in_logs() -> None:
    """In a log, the Hugging Face libraries' own bars (transformers' "Loading weights", datasets' saving) would be
    carriage-return updates too: off there. Their switch is an environment variable that huggingface_hub reads
    when it is imported, so this runs on `import loraline`, before any stage imports them."""
    if lines_wanted():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def lines_wanted() -> bool:
    setting = os.environ.get(ENV)
    if setting in ("bar", "lines"):
        return setting == "lines"
    return not sys.stderr.isatty()


def mode_for_children() -> str:
    """What a process whose output this one passes through should use: what this one would."""
    return "lines" if lines_wanted() else "bar"


class _OneLinePerUpdate:
    """A stream for tqdm that turns each redraw ("\\r" + the bar) into one line of its own."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
