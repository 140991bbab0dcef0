"""Sharded (FSDP2) against replicated (DDP) training on 2 CPU processes, side by side.

    uv run python benchmarks/bench_sharding.py                  # Qwen2.5-0.5B's shapes, 24 layers
    uv run python benchmarks/bench_sharding.py --layers 4       # same widths and vocabulary, 4 layers

The model is randomly initialised with Qwen2.5-0.5B's shapes (hidden 896, 14 heads / 2 KV
heads, MLP 4864, vocabulary 151936, tied embeddings; built locally, nothing downloaded).
Each mode runs in its own pair of processes (gloo, one thread each), one mode after the other:

* ``ddp``: ``DistributedDataParallel`` around the model, fp32 AdamW on every rank (what the
  trainer does without a strategy);
* ``fsdp2``: the trainer's sharding (``grpo_lightning.sharding.shard``: each decoder layer, then
  a root), AdamW over the sharded parameters.

A step is a forward of a ``--batch`` x ``--seq`` batch (next-token loss), backward, gradient
clipping, AdamW step. Columns per rank:

* ``state``: bytes of this rank's parameters + gradients + optimizer state after a step, counted
  from the tensors it holds (for DDP also its gradient buckets, a second copy of the
  gradients), and that total per parameter of the model;
* ``peak RSS``: the process's peak resident memory (libraries and activations included);
* ``s/step``: mean over ``--steps`` timed steps after one warm-up step.

Then the sharded model is exported as a Hugging Face folder (rank 0 writes) two ways: our
streaming export (``sharding.save_pretrained_sharded``: one tensor gathered at a time, a shard
file written and freed every ``--max-shard-mb``) and the one-shot alternative (the whole
``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` on rank 0, then one
``save_file``); rank 0's time and its host-memory peak above the trained state are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def qwen_05b_config(layers: int, vocab: int = 151936):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, use_cache=False,
    )


class RssPeak:
    """Peak resident memory of this process while the block runs, sampled every 2 ms
    (ru_maxrss cannot be reset, so a later phase's peak needs its own sampler)."""

    def __enter__(self) -> RssPeak:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _bytes(tensors) -> int:
    from grpo_lightning.sharding import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, ddp: torch.nn.Module | None) -> int:
    params = list(model.parameters())
    total = _bytes(params) + _bytes(p.grad for p in params)
    total += _bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    if ddp is not None:
        # DDP's gradient buckets: one flat copy of every gradient (gradient_as_bucket_view=False).
        total += _bytes(p for p in params if p.requires_grad)
    return total


def worker(rank: int, world: int, mode: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import AutoModelForCausalLM

    from grpo_lightning import sharding

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen_05b_config(args.layers, args.vocab), dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    ddp = None
    if mode == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)

        def loss_fn(ids):
            return ddp(input_ids=ids, labels=ids).loss
    else:
        from torch.distributed.device_mesh import init_device_mesh

        root = sharding.shard(model, init_device_mesh("cpu", (world,)), mixed_precision=False)

        def loss_fn(ids):
            return sharding.call(root, lambda m, x: m(input_ids=x, labels=x).loss, ids)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank))
    times = []
    for step in range(args.steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        loss_fn(ids).backward()
        sharding.full_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        if step < args.steps:
            opt.zero_grad(set_to_none=False)  # keep the gradients allocated: they are part of the state
        dist.barrier()
        times.append(time.perf_counter() - t0)
    row = {
        "mode": mode, "rank": rank, "params": n_params,
        "state": _state_bytes(model, opt, ddp),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "s_per_step": sum(times[1:]) / args.steps,
    }
    if mode == "fsdp2":
        opt.zero_grad(set_to_none=True)
        del opt
        row.update(_export(model, rank, args))
    Path(out, f"{mode}_{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def _export(model: torch.nn.Module, rank: int, args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from grpo_lightning.sharding import save_pretrained_sharded

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        dist.barrier()
        with RssPeak() as mem:
            t0 = time.perf_counter()
            save_pretrained_sharded(model, Path(tmp, "stream"), write=rank == 0, max_shard_bytes=args.max_shard_mb * 2**20)
            dist.barrier()
        results["export_stream"] = (time.perf_counter() - t0, mem.peak - mem.base)
        dist.barrier()
        with RssPeak() as mem:
            t0 = time.perf_counter()
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                Path(tmp, "full").mkdir()
                save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight"}, str(Path(tmp, "full", "model.safetensors")))
            del full
            dist.barrier()
        results["export_full"] = (time.perf_counter() - t0, mem.peak - mem.base)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2.5-0.5B has 24)")
    parser.add_argument("--vocab", type=int, default=151936, help="smaller only to smoke-test the script")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--max-shard-mb", type=int, default=256, help="shard file size of the streaming export")
    parser.add_argument("--modes", default="ddp,fsdp2")
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    world = 2
    with tempfile.TemporaryDirectory() as out:
        rows = {}
        for mode in args.modes.split(","):
            mp.spawn(worker, args=(world, mode, args, out), nprocs=world, join=True)
            rows[mode] = [json.loads(Path(out, f"{mode}_{r}.json").read_text()) for r in range(world)]
    n = next(iter(rows.values()))[0]["params"]
    gib = 2**30
    print(f"Qwen2.5-0.5B shapes, {args.layers} layers: {n / 1e6:.0f}M parameters; 2 CPU ranks (gloo); "
          f"batch {args.batch} x {args.seq} tokens\n")
    print("| mode | rank | state (GiB) | state bytes/param | peak RSS (GiB) | s/step |")
    print("|---|---|---|---|---|---|")
    for mode, ranks in rows.items():
        for r in ranks:
            print(f"| {mode} | {r['rank']} | {r['state'] / gib:.2f} | {r['state'] / n:.2f} | "
                  f"{r['peak_rss'] / gib:.2f} | {r['s_per_step']:.2f} |")
    if "ddp" in rows and "fsdp2" in rows:
        ratio = max(r["state"] for r in rows["fsdp2"]) / max(r["state"] for r in rows["ddp"])
        print(f"\nsharded state / DDP state per rank: {ratio:.2f}x")
    if "fsdp2" in rows:
        r0 = rows["fsdp2"][0]
        print(f"\nHF export of the sharded model ({n * 4 / gib:.2f} GiB of fp32 weights), rank 0:\n")
        print("| export | seconds | host memory peak above the trained state (GiB) |")
        print("|---|---|---|")
        for key, label in (("export_stream", f"streamed, {args.max_shard_mb} MiB shards (ours)"),
                           ("export_full", "full state dict on rank 0, then save_file")):
            seconds, peak = r0[key]
            print(f"| {label} | {seconds:.2f} | {peak / gib:.2f} |")


if __name__ == "__main__":
    main()
