"""The files of a run directory: durable atomic writes, and reading the metrics files back.

Light on purpose (no torch, no Lightning): ``sweep`` and ``plot`` use it too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any


def replace_durably(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` (a file or a folder of files) to ``target`` once its bytes are on disk.

    The rename alone survives a killed process; the fsyncs also survive a power cut, after
    which a renamed but never flushed file could otherwise be empty.
    """
    for f in [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    replace_durably(tmp, path)


def _finite(x: Any) -> Any:
    # JSON has no NaN: keep the key with null so the files keep a fixed shape.
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if hasattr(x, "item"):  # numpy / torch scalars
        return _finite(x.item())
    return x


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as JSON (non-finite floats as null), written atomically."""
    write_text_atomic(path, json.dumps(_finite(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_evals(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The evaluations of a run by step (baseline at 0, the eval after iteration i at i + 1).

    Files being written (or cut short by a crash) are skipped, as are evals without a step
    (``validate``'s ``eval_validate.json``)."""
    evals: dict[int, dict[str, Any]] = {}
    for path in sorted(Path(run_dir, "metrics").glob("eval_*.json")):
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(path.read_text())
            if isinstance(data.get("step"), int):
                evals[data["step"]] = data
    return dict(sorted(evals.items()))


def read_train(run_dir: Path) -> list[dict[str, Any]]:
    """The ``train_iter_*.json`` files of a run, in iteration order."""
    out = []
    for path in Path(run_dir, "metrics").glob("train_iter_*.json"):
        with contextlib.suppress(ValueError, OSError):
            out.append(json.loads(path.read_text()))
    return sorted(out, key=lambda m: m["iteration"])
