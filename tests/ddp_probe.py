"""A callback for the DDP test: each rank writes a digest of its policy weights, and how many
of the rollouts it trains on lack reference log-probabilities."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl
import torch


class WeightDigest(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        micro = trainer.train_dataloader.dataset
        mine = {i for mb in micro.schedule for i in mb.indices}
        stored = pl_module._fixed.get("ref_logprobs", {})
        missing = sum(i not in stored for i in mine)
        (Path(trainer.log_dir) / f"missing_ref_rank{trainer.global_rank}.txt").write_text(f"{missing} of {len(mine)}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        h = hashlib.sha256()
        for name, p in sorted(pl_module.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
        out = Path(trainer.log_dir) / f"digest_rank{trainer.global_rank}.txt"
        out.write_text(h.hexdigest())
