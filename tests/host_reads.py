"""A callback for the host-read test: counts, per micro-batch, the tensor reads inside
``training_step`` that copy a value to the host (a CUDA synchronisation each, on a GPU), made
by grpo_lightning's own code. Reads by torch's optimizer (its step counters live on the host)
and by transformers are not ours to remove and are not counted."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.overrides import TorchFunctionMode

import grpo_lightning

READS = {"__bool__", "__float__", "__int__", "item", "tolist", "cpu", "numpy"}
OURS = str(Path(grpo_lightning.__file__).parent)


class _Count(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in READS:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(OURS):
                self.seen[f"{func.__name__} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


class HostReads(pl.Callback):
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rows: list[dict[str, Any]] = []
        step = pl_module.training_step

        def counted(batch: dict[str, Any], batch_idx: int) -> Any:
            with _Count() as c:
                out = step(batch, batch_idx)
            self.rows.append({"step_end": bool(batch["step_end"]), "reads": dict(c.seen)})
            return out

        pl_module.training_step = counted

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (Path(trainer.log_dir) / "host_reads.json").write_text(json.dumps(self.rows))
