"""The saving side of the crash-atomic test (tests/test_reliability_atomic.py).

Started as ``python tests/atomic_saver.py '{"new": DIR, "old": DIR}'``: loads those artifacts, writes
``{"ready": true}``, then answers one JSON line per request:

- ``{"op": "time", "which": "new", "dest": D}``: five uninterrupted saves in forked children;
  ``{"seconds": the median fork-to-exit time}``;
- ``{"op": "kill", "which": "new", "dest": D, "delay": s}``: fork a child that saves to D, SIGKILL it
  after ``s`` seconds; ``{"landed": true}`` when the kill arrived before the save had finished.

Why a process of its own: a child forked from a process whose torch has used its OpenMP thread pool
deadlocks in its first torch op (libgomp is not fork-safe), and the test process has compiled models.
This one sets one torch thread before any torch op, so its forked children can run torch (the save
copies tensors) safely.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings


def fork_save(compiled, dest: str) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            compiled.save(dest)
            code = 0
        finally:
            os._exit(code)  # no atexit handlers, no flushing of the parent's buffers
    return pid


def exited_ok(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def kill_after(pid: int, delay: float) -> bool:
    deadline = time.perf_counter() + delay
    while time.perf_counter() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if not exited_ok(status):
                raise RuntimeError(f"the save failed: status {status}")
            return False
        time.sleep(min(0.0002, max(0.0, deadline - time.perf_counter())))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        if not exited_ok(status):
            raise RuntimeError(f"the save failed: status {status}")
        return False
    return os.WTERMSIG(status) == signal.SIGKILL


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)  # before any torch op: see the module docstring
    import lowbit

    models = {name: lowbit.load(path) for name, path in json.loads(sys.argv[1]).items()}
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        compiled = models[req["which"]]
        if req["op"] == "time":
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                _, status = os.waitpid(fork_save(compiled, req["dest"]), 0)
                times.append(time.perf_counter() - t0)
                if not exited_ok(status):
                    raise RuntimeError(f"the save failed: status {status}")
            out.write(json.dumps({"seconds": sorted(times)[len(times) // 2]}) + "\n")
        else:
            landed = kill_after(fork_save(compiled, req["dest"]), float(req["delay"]))
            out.write(json.dumps({"landed": landed}) + "\n")


if __name__ == "__main__":
    main()
