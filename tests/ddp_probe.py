"""A callback for the DDP test: each rank writes a digest of its policy weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl
import torch


class WeightDigest(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        h = hashlib.sha256()
        for name, p in sorted(pl_module.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
        out = Path(trainer.log_dir) / f"digest_rank{trainer.global_rank}.txt"
        out.write_text(h.hexdigest())
