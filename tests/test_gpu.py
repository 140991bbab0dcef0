"""Checks that need a CUDA device (skipped elsewhere); ``benchmarks/gpu_check.py`` runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grpo_lightning.cli import auto_precision
from grpo_lightning.logprobs import sequence_token_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[1]


def test_auto_precision_is_bf16_mixed_on_cuda() -> None:
    assert auto_precision("auto") == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true")
    assert auto_precision("cpu") == "32-true"


def test_chunked_logprobs_under_bf16_autocast_match_fp32(tiny_model) -> None:
    model = tiny_model.to("cuda")
    ids = torch.randint(0, model.config.vocab_size - 16, (4, 96), device="cuda")
    mask = torch.ones_like(ids)
    ref, _ = sequence_token_logprobs(model, ids, mask, naive=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, ent = sequence_token_logprobs(model, ids, mask, with_entropy=True)
    assert got.dtype == torch.float32 and ent is not None
    assert (got - ref).abs().max().item() < 0.05  # bf16 matmuls, fp32 log-softmax
    model.to("cpu")


def test_fit_on_cuda_with_server_on_cuda(tmp_path: Path) -> None:
    """A short run: bf16-mixed training step, built-in server on CUDA, weight sync, evaluation."""
    from grpo_lightning.cli import main

    assert main(["fit", "--config", str(ROOT / "configs" / "sat_tiny.yaml"),
          "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.max_epochs", "2",
          "--data.server.device", "cuda", "--data.server.dtype", "float32", "--data.eval.num_problems", "16",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "gpu"]) == 0
    run = tmp_path / "gpu" / "version_0"
    m = json.loads((run / "metrics" / "train_iter_001.json").read_text())
    assert m["sync/verified"] is True
    assert m["train/optimizer_steps"] >= 1
    assert m["train/mismatch/abs_mean"] < 0.1  # server (fp32 on CUDA) vs trainer (bf16 autocast)
    assert (run / "checkpoints" / "last.ckpt").exists()
    config = (run / "config.yaml").read_text()
    assert "accelerator: gpu" in config


def test_tf32_head_stays_within_a_hundredth_of_a_nat_of_fp64() -> None:
    """``trainer.tf32`` (the default) runs the log-probability head's fp32 products on TF32
    tensor cores; the log-probabilities stay far closer to exact than bf16 logits would be."""
    from grpo_lightning.cli import GRPOTrainer
    from grpo_lightning.logprobs import token_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(512, 1536, device="cuda", generator=g)
    w = torch.randn(151936, 1536, device="cuda", generator=g) * 0.1  # logits std ~4, extremes ~20
    y = torch.randint(0, 151936, (512,), device="cuda", generator=g)
    ref, _ = token_logprobs(h.double(), w.double(), y)
    try:
        errors = {}
        for tf32 in (False, True):
            GRPOTrainer(accelerator="cpu", logger=False, enable_checkpointing=False, tf32=tf32)
            assert torch.backends.cuda.matmul.allow_tf32 is tf32
            got, _ = token_logprobs(h, w, y)
            errors[tf32] = (got.double() - ref).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True
    assert errors[False] < 1e-3  # true fp32
    assert errors[True] < 0.02
    assert errors[True] > errors[False]  # TF32 was really used
