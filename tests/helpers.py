"""Helpers shared by test modules: run metrics files, comparing iterations, processes and waiting."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def without_times(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def assert_same_iteration(a: dict, b: dict, name: str = "") -> None:
    """Same problems, completions and rewards exactly; the training statistics to float noise.

    The built-in server batches continuously, so which requests share a forward pass depends
    on timing and its logprobs move in the last float bits (~1e-7, as vLLM's do): a repeated
    iteration trains on the same rollouts with slightly different behaviour logprobs."""
    a, b = without_times(a), without_times(b)
    assert a.keys() == b.keys(), name
    for key in a:
        if key.startswith("train/") and isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), f"{name}: {key}"
        else:
            assert a[key] == b[key], f"{name}: {key}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def processes_with(needle: str) -> list[int]:
    """Pids of live processes whose command line contains ``needle`` (arguments space-separated)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
