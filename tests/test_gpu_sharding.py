"""Sharded training on CUDA (skipped elsewhere): FSDP2 with bf16 compute and fp32 master
weights through ModelParallelStrategy, on one GPU (a one-rank mesh exercises the same code as
N ranks: per-layer units, the root, mixed precision, the HF export, the folder checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_fit_on_one_gpu_with_bf16_compute(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from grpo_lightning.cli import main

    assert main(["fit", "--config", str(ROOT / "configs" / "sat_tiny.yaml"),
                 "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.max_epochs", "2",
                 "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                 "--trainer.strategy.data_parallel_size", "1", "--trainer.strategy.tensor_parallel_size", "1",
                 "--model.kl_coef", "0.05",
                 "--data.server.device", "cuda", "--data.server.dtype", "float32", "--data.eval.num_problems", "16",
                 "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "gpu"]) == 0
    run = tmp_path / "gpu" / "version_0"
    m = json.loads((run / "metrics" / "train_iter_001.json").read_text())
    assert m["sync/verified"] is True and m["train/optimizer_steps"] >= 1
    assert m["train/mismatch/abs_mean"] < 0.1  # server fp32 vs trainer bf16 compute
    assert m["train/kl/mean"] >= 0
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    weights = load_file(run / "sync_weights" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())  # fp32 master weights exported


def test_bf16_sharded_logprobs_match_fp32(tiny_model) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from grpo_lightning.logprobs import sequence_token_logprobs
    from grpo_lightning.sharding import call, shard

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
    try:
        import copy

        model = copy.deepcopy(tiny_model).to("cuda")
        ids = torch.randint(0, model.config.vocab_size - 16, (4, 64), device="cuda")
        mask = torch.ones_like(ids)
        ref, _ = sequence_token_logprobs(model, ids, mask, naive=True)
        root = shard(model, init_device_mesh("cuda", (1,)), mixed_precision=True)
        got, _ = call(root, sequence_token_logprobs, ids, mask)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
        assert (got - ref).abs().max().item() < 0.05
    finally:
        dist.destroy_process_group()
