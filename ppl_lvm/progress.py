"""Progress bars for long work (estimators, AIS, infer_local, completion): one tqdm bar per phase.

Off unless asked for (`with shown():`, as the command line does without `--quiet`), so a library
call prints nothing; on, a bar is drawn only on a terminal (a log file gets no per-step lines)
and only by rank 0 of a torchrun group. Code that loops calls ``with phase(...)`` and
``advance()``; a phase inside a phase is drawn below it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
import os
import sys

from tqdm.auto import tqdm

__all__ = ["shown", "phase", "advance", "chunks", "enabled"]

_enabled = [False]
_bars = []


def enabled() -> bool:
    """Whether bars are drawn: asked for, on a terminal, and on rank 0."""
    return (_enabled[-1] and sys.stderr.isatty()
            and os.environ.get("RANK", "0") in ("", "0"))


@contextlib.contextmanager
def shown(on: bool = True) -> Iterator[None]:
    """Draw the bars of the phases inside (``on=False``: none)."""
    _enabled.append(bool(on))
    try:
        yield
    finally:
        _enabled.pop()


@contextlib.contextmanager
def phase(description: str, total: int, unit: str = "it") -> Iterator[tqdm]:
    """A bar for one phase of ``total`` units; ``advance(n)`` moves the innermost one."""
    bar = tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True,
               disable=not enabled(), position=len(_bars))
    _bars.append(bar)
    try:
        yield bar
    finally:
        _bars.pop()
        bar.close()


def advance(n: int = 1) -> None:
    """Move the innermost bar by ``n`` (nothing outside a phase)."""
    if _bars:
        _bars[-1].update(n)


def chunks(num_rows: int, rows_per_call: int, description: str, unit: str = "row"
           ) -> Iterator[int]:
    """``range(0, num_rows, rows_per_call)`` in a phase whose bar counts the rows done."""
    with phase(description, num_rows, unit=unit):
        for start in range(0, num_rows, rows_per_call):
            yield start
            advance(min(rows_per_call, num_rows - start))
