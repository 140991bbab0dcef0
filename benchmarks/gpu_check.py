"""GPU check: the GPU-marked tests, then training-step throughput and MFU of a Qwen2.5-1.5B-shaped
model in bf16. Runs with no network in under 8 minutes on one H100.

    uv run python benchmarks/gpu_check.py                # on a CUDA machine
    uv run python benchmarks/gpu_check.py --dry-run      # anywhere: a tiny model on the CPU

The throughput step is the trainer's: a random-initialised Qwen2 model with Qwen2.5-1.5B's
shape (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocabulary 151,936, tied
embeddings) in bf16 autocast with fp32 master weights, forward + backward of the GRPO loss
(dapo) with the chunked log-probabilities on micro-batches of SAT-like rollouts, then AdamW.

MFU = model FLOPs per second / the GPU's dense bf16 peak. Model FLOPs per token:
6 * N (weights, forward + backward) + 12 * layers * hidden * sequence length (attention scores
and values), the accounting of PaLM (Chowdhery et al. 2022, appendix B). Target: >= 40% on an H100.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from grpo_lightning.logprobs import sequence_token_logprobs
from grpo_lightning.loss import LossConfig, Normalizer, grpo_loss

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (no sparsity), in FLOP/s, by device-name substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run_tests(dry_run: bool) -> int:
    """The GPU-marked tests (skipped, not failed, without CUDA)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def throughput(shape: dict, device: torch.device, seq_len: int, batch: int, steps: int, ckpt: bool) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**shape, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).to(device)  # fp32 master weights
    if ckpt:
        model.gradient_checkpointing_enable()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    cfg = LossConfig(loss_type="dapo", max_completion_length=seq_len)
    prompt = seq_len // 4  # SAT prompts are short next to long reasoning completions
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    attn = torch.ones_like(ids)
    mask = torch.zeros(batch, seq_len - 1, device=device)
    mask[:, prompt - 1 :] = 1
    behaviour = torch.zeros_like(mask)
    adv = torch.randn(batch, device=device)
    norm = Normalizer.from_mask(mask)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            logp, _ = sequence_token_logprobs(model, ids, attn, loss_positions=mask.bool(), chunk_size=4096)
        out = grpo_loss(logp, behaviour, adv, mask, cfg, norm)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    tokens = batch * seq_len
    flops_per_token = 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len
    achieved = flops_per_token * tokens / seconds
    peak = peak_flops(device)
    return {
        "params_M": n_params / 1e6,
        "tokens/step": tokens,
        "step_s": seconds,
        "tokens/s": tokens / seconds,
        "TFLOP/s": achieved / 1e12,
        "MFU": achieved / peak if peak else None,
        "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script, no targets")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}; torch {torch.__version__}", flush=True)
    rc = 0 if args.skip_tests else run_tests(args.dry_run)
    if not cuda and not args.dry_run:
        print("no CUDA device: the GPU tests were skipped; run with --dry-run to exercise the throughput path")
        return rc
    shape, seq, batch, steps = (TINY, 128, 4, 2) if args.dry_run else (QWEN25_15B, args.seq_len, args.batch, args.steps)
    rows = [("no checkpointing", throughput(shape, device, seq, batch, steps, ckpt=False))]
    if cuda:
        torch.cuda.empty_cache()
        rows.append(("gradient checkpointing", throughput(shape, device, seq, batch, steps, ckpt=True)))
    keys = list(rows[0][1])
    print("\n| run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, r in rows:
        cells = ["—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)) for v in r.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    mfu = rows[0][1]["MFU"]
    if mfu is not None:
        print(f"\nMFU {mfu:.1%} (target >= 40% on an H100)")
    return rc


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
