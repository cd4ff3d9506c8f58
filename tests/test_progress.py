"""Progress bars: off when disabled, throttled when the output is not a terminal."""

from __future__ import annotations

import io

import pytest

from tinydiff._progress import NON_INTERACTIVE_MININTERVAL, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_output_stays_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = io.StringIO()
    bar = progress_bar(range(20_000), desc="training", file=log)
    assert bar.mininterval == NON_INTERACTIVE_MININTERVAL
    for _ in bar:
        pass
    # the first and the final state only (a fast loop never waits 30 s)
    assert log.getvalue().count("training") <= 3 and len(log.getvalue()) < 1000


def test_terminal_keeps_tqdm_defaults_and_disabled_writes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert progress_bar(range(3), file=_Terminal()).mininterval == 0.1
    quiet = io.StringIO()
    for _ in progress_bar(range(100), enabled=False, file=quiet):
        pass
    assert quiet.getvalue() == ""
