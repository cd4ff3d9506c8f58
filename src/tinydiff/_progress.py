"""Progress bars that keep logs small: the one place that decides how tinydiff's bars behave.

On a terminal or in a notebook a bar updates as tqdm's usually do. When stderr is a file or a
pipe (a log, CI, ``nohup``), tqdm would write a new bar state every 0.1 s, hundreds of KB over
a long run; there the bar updates at most every `NON_INTERACTIVE_MININTERVAL` seconds (tqdm's
own ``TQDM_MININTERVAL`` environment variable, when set, wins).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

NON_INTERACTIVE_MININTERVAL = 30.0
"""Seconds between two updates of a bar whose output is not a terminal."""


def _interactive(file: IO[str] | None) -> bool:
    notebook = sys.modules.get("tqdm.notebook")
    if notebook is not None and issubclass(tqdm, notebook.tqdm):
        return True  # a notebook widget, not text
    isatty = getattr(file if file is not None else sys.stderr, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    enabled: bool = True,
    desc: str | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar that is off unless ``enabled`` and throttled when not on a terminal.

    Args:
        iterable: what to iterate over (optional, as for tqdm).
        enabled: False gives a disabled bar (nothing is written).
        desc: the bar's label.
        **kwargs: passed to ``tqdm`` (``total``, ``initial``, ``leave``, ``file``...).

    Returns:
        the ``tqdm.auto.tqdm`` bar.
    """
    if enabled and not _interactive(kwargs.get("file")) and "TQDM_MININTERVAL" not in os.environ:
        kwargs.setdefault("mininterval", NON_INTERACTIVE_MININTERVAL)
    return tqdm(iterable, desc=desc, disable=not enabled, **kwargs)
