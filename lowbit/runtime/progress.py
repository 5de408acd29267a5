"""Progress on a long step that has no count to show (an engine build, an export, loading a model): a line on
stderr when it starts and its time when it ends. Like the tqdm bars of calibration, GPTQ and sensitivity, it shows
only on a terminal (``force`` for the command line, which reports its steps however it is run)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def step(desc: str, enabled: bool = True, *, force: bool = False) -> Iterator[None]:
    show = enabled and (force or sys.stderr.isatty())
    t0 = time.perf_counter()
    if show:
        print(f"{desc} ...", file=sys.stderr, flush=True)
    yield
    if show:
        print(f"{desc}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
