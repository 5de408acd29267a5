"""Progress of the long steps. ``progress`` (``lowbit.compile(progress=...)``) is True (show on a terminal only),
False (never) or ``"always"`` (also into a log file or pipe: the ``lowbit`` command's ``--progress always``).

Counted steps (calibration batches, GPTQ layers, AWQ groups, sensitivity evaluations) are tqdm bars; ``step``
covers a step with no count (an engine build, an export, loading a model): a line on stderr when it starts and
its time when it ends."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

Progress = bool | str  # True, False or "always"


def bar_disabled(progress: Progress) -> bool | None:
    """tqdm's ``disable``: None lets tqdm show the bar on a terminal only."""
    return True if not progress else (False if progress == "always" else None)


@contextmanager
def step(desc: str, progress: Progress = True, *, force: bool = False) -> Iterator[None]:
    show = bool(progress) and (force or progress == "always" or sys.stderr.isatty())
    t0 = time.perf_counter()
    if show:
        print(f"{desc} ...", file=sys.stderr, flush=True)
    yield
    if show:
        print(f"{desc}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
