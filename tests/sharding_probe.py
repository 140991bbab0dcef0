"""A callback for the sharded-training test: at the end of training every rank gathers the
sharded policy in full and writes it, and rank 0 runs the weight-sync probe as a collective
(the path vLLM/SGLang verification takes) while the other ranks join it."""

from __future__ import annotations

import json

import lightning.pytorch as pl
from safetensors.torch import save_file

from grpo_lightning.callbacks import run_dir
from grpo_lightning.sharding import RankZeroCalls, gathered_tensors

PROBES = [([1, 2, 3, 4], [5, 6, 7]), ([8, 9], [10, 11, 12, 13])]


class GatheredWeights(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = run_dir(trainer)
        tensors = dict(gathered_tensors(pl_module.policy, write=True))  # every rank keeps a full copy
        save_file(tensors, str(out / f"gathered_rank{trainer.global_rank}.safetensors"))
        probe = RankZeroCalls(pl_module.probe_logprobs, trainer.strategy.broadcast)
        if trainer.is_global_zero:
            try:
                values = [probe(prompt, completion) for prompt, completion in PROBES]
            finally:
                probe.close()
            (out / "probe.json").write_text(json.dumps(values))
        else:
            probe.serve()
