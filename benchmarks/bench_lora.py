"""LoRA against full fine-tuning: weight-sync cost and trainer memory, side by side.

    uv run python benchmarks/bench_lora.py                       # tiny-sat + 1.5B shape, 2 layers
    uv run python benchmarks/bench_lora.py --layers 28 --device cuda   # the whole 1.5B shape
    uv run python benchmarks/bench_lora.py --learning RUN_DIR [RUN_DIR ...]   # eval success table

**Sync** (one row per model and mode): what the trainer does after an iteration, against a
real built-in server started on the model: write the policy (full: the whole model as
safetensors; LoRA: the PEFT adapter), have the server load it (full: ``/update_weights_from_disk``;
LoRA: ``/v1/load_lora_adapter``, merged into the base weights it keeps), and verify the served
weights' checksum against the trainer's (full: of the whole model; LoRA: of the base, known
once, and the adapter). Bytes are those written to the sync folder; times are the median of
``--repeats`` syncs (each of different weights), full and LoRA interleaved on two servers,
after one untimed sync of each.

**Memory** (kl_coef > 0): the bytes held after one optimizer step, counted tensor by tensor:
parameters (each storage once), gradients, AdamW state and the reference model; with CUDA
also the allocator's peak over the step (activations included).

Models: ``tiny-sat`` (the CPU default), and a randomly initialised Qwen2 model with
Qwen2.5-1.5B's shapes (hidden 1536, MLP 8960, 12 heads, 2 KV heads, vocabulary 151,936, tied
embeddings) and ``--layers`` of its 28 decoder layers, built locally. LoRA: rank 16, alpha 32,
every attention and MLP projection (the ``model.lora`` defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from grpo_lightning.inference.launch import ManagedServer, ServerConfig
from grpo_lightning.inference.weight_sync import sync_weights
from grpo_lightning.lora import LoraArgs
from grpo_lightning.models import load_tokenizer, resolve_model_path
from grpo_lightning.module import GRPOModule


def qwen15b_folder(root: Path, layers: int) -> Path:
    """A random Qwen2 model with Qwen2.5-1.5B's shapes (``layers`` of its decoder layers)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = root / f"qwen2.5-1.5b-shape-{layers}l"
    if (folder / "config.json").exists():
        return folder
    cfg = Qwen2Config(
        hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
        num_hidden_layers=layers, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope_theta=1e6,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    # The server only decodes: any tokenizer will do (unknown ids decode to nothing).
    load_tokenizer("tiny-sat", chat=False).save_pretrained(folder)
    return folder


def module_for(model: str, lora: bool, kl_coef: float = 0.0) -> GRPOModule:
    m = GRPOModule(model_name_or_path=model, kl_coef=kl_coef, lora=LoraArgs(enabled=lora))
    m.configure_model()
    return m


def perturb(m: GRPOModule, k: int) -> None:
    """Change every trainable weight, as an optimizer step would (different weights each sync)."""
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for p in m.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 1e-3)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def bench_sync(name: str, model: str, repeats: int, work: Path, device: str) -> list[dict]:
    """Full and LoRA syncs interleaved (one server each, both up), so that load from other
    work hits both alike. One untimed sync of each first: it pays what a run pays once (the
    trainer's checksum of the LoRA base, the server's copy of the adapted base weights)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name)
    cfg = ServerConfig(backend="builtin", device=device, dtype="float32", startup_timeout=600)
    modes = {False: "full", True: "LoRA r16"}
    modules = {lora: module_for(model, lora) for lora in modes}
    times: dict[bool, list[tuple[float, float, float]]] = {lora: [] for lora in modes}
    sizes: dict[bool, int] = {}
    with contextlib.ExitStack() as stack:
        servers = {lora: stack.enter_context(ManagedServer(cfg, model=model, log_path=work / f"{slug}-{lora}.log"))
                   for lora in modes}
        for k in range(repeats + 1):
            for lora in modes:
                m = modules[lora]
                perturb(m, k)
                folder = work / f"sync-{slug}-{lora}"
                t0 = time.perf_counter()
                m.save_hf(folder)
                save_s = time.perf_counter() - t0
                sizes[lora] = folder_bytes(folder)
                report = sync_weights(servers[lora], folder)
                assert report.verified and report.method == ("adapter" if lora else "disk")
                if k > 0:
                    times[lora].append((save_s, report.seconds, report.verify_seconds))
    med = statistics.median
    rows = [{"model": name, "mode": modes[lora], "bytes": sizes[lora],
             "save_s": med(t[0] for t in times[lora]), "load_s": med(t[1] for t in times[lora]),
             "verify_s": med(t[2] for t in times[lora]), "total_s": med(sum(t) for t in times[lora])}
            for lora in modes]
    for row in rows:  # how many times faster than the full sync
        row["speedup"] = rows[0]["total_s"] / row["total_s"]
    del modules
    gc.collect()
    return rows


def held_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def bench_memory(name: str, model: str, device: str) -> list[dict]:
    from grpo_lightning.logprobs import sequence_token_logprobs

    rows = []
    for lora in (False, True):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        m = module_for(model, lora, kl_coef=0.05)
        m.to(device)
        if m.ref_model is not None:
            m.ref_model.to(device)
        params = [p for p in m.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        ids = torch.randint(0, m.policy.config.vocab_size, (4, 256), device=device)
        with m.reference() as ref, torch.no_grad():
            ref_lp, _ = sequence_token_logprobs(ref, ids, torch.ones_like(ids))
        lp, _ = sequence_token_logprobs(m.policy, ids, torch.ones_like(ids))
        (lp - ref_lp).pow(2).mean().backward()  # a KL-like loss: gradients reach every trainable weight
        opt.step()
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        ref_params = list(m.ref_model.parameters()) if m.ref_model is not None else []
        row = {
            "model": name, "mode": "LoRA r16" if lora else "full",
            "trainable": sum(p.numel() for p in params),
            "params_GB": held_bytes(m.policy.parameters()) / 1e9,
            "grads_GB": held_bytes(p.grad for p in params) / 1e9,
            "adam_GB": held_bytes(state) / 1e9,
            "reference_GB": held_bytes(ref_params) / 1e9,
        }
        row["total_GB"] = row["params_GB"] + row["grads_GB"] + row["adam_GB"] + row["reference_GB"]
        if device == "cuda":
            row["cuda_peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
        rows.append(row)
        del m, opt, params, state, ref_params, lp
        gc.collect()
    return rows


def learning_rows(run_dirs: list[str]) -> list[dict]:
    rows = []
    for d in run_dirs:
        metrics = Path(d) / "metrics"
        evals = sorted(metrics.glob("eval_iter_*.json"), key=lambda p: int(p.stem.split("_")[-1]))
        if not evals or not (metrics / "eval_baseline.json").exists():
            continue
        base = json.loads((metrics / "eval_baseline.json").read_text())
        last = json.loads(evals[-1].read_text())
        rows.append({"run": d, "iterations": int(evals[-1].stem.split("_")[-1]) + 1,
                     "baseline": base["success_rate"], "final": last["success_rate"],
                     "gain": last["success_rate"] - base["success_rate"],
                     "curve": " ".join(f"{json.loads(e.read_text())['success_rate']:.3f}" for e in evals)})
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    fmt = lambda v: f"{v:,}" if isinstance(v, int) else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 1.5B-shaped model (28: all)")
    ap.add_argument("--repeats", type=int, default=3, help="syncs per row (median)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="trainer memory and the server")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sync", "memory", "tiny", "qwen"])
    ap.add_argument("--work", default=None, help="folder for the models and sync folders (default: a temporary one)")
    ap.add_argument("--learning", nargs="*", default=None, help="run dirs: print their eval success instead")
    args = ap.parse_args()
    if args.learning is not None:
        print(table(learning_rows(args.learning)))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    models = []
    if "tiny" not in args.skip:
        models.append(("tiny-sat", resolve_model_path("tiny-sat")))
    if "qwen" not in args.skip:
        models.append((f"Qwen2.5-1.5B shape, {args.layers}/28 layers", str(qwen15b_folder(work, args.layers))))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if "sync" not in args.skip:
        rows = [r for name, path in models for r in bench_sync(name, path, args.repeats, work, args.device)]
        print("## sync (built-in server, float32)\n" + table(rows), flush=True)
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if "memory" not in args.skip:
        rows = [r for name, path in models for r in bench_memory(name, path, args.device)]
        print("## trainer memory after one step (kl_coef 0.05)\n" + table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
