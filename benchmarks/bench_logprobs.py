"""Peak memory and time of per-token log-probabilities, forward + backward: naive vs chunked.

    uv run python benchmarks/bench_logprobs.py                  # Qwen2.5 sizes, CUDA if present
    uv run python benchmarks/bench_logprobs.py --device cpu --quick

Both paths get the same data (same seed): final hidden states ``[N, H]`` and an output
embedding ``[V, H]``, both requiring grad, and random targets. The objective is
``sum(logp * g)`` for a fixed random ``g`` (what a policy-gradient loss looks like to this
layer).

With ``--entropy`` both paths also return per-token entropies and the objective adds their
sum (what an entropy bonus or the entropy metric costs).

* naive: ``logits = hidden @ weight.T`` then an fp32 log-softmax gathered at the targets
  (:func:`grpo_lightning.logprobs.selective_log_softmax`), i.e. what ``model(...).logits``
  plus a log-softmax costs.
* chunked: :func:`grpo_lightning.logprobs.token_logprobs`.

Memory is the peak *above* the inputs: on CUDA ``torch.cuda.max_memory_allocated`` minus the
allocation after building the inputs; on CPU each path runs in a fresh subprocess and reports
its peak RSS (``resource.getrusage``) minus the peak RSS after building the inputs. Both
include the gradient buffers of hidden and weight (``V * H * 4`` bytes in fp32), which any
path needs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from grpo_lightning.logprobs import entropy_from_logits, selective_log_softmax, token_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(args: argparse.Namespace, device: torch.device):
    """The same inputs on every device, filled in place: no freed temporaries that would
    inflate the RSS baseline (RSS peaks only grow, so a freed transient hides later use)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[args.dtype]

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype).normal_(0.0, std, generator=g).to(device)

    hidden = randn(args.tokens, args.hidden, std=0.5).requires_grad_()
    weight = randn(args.vocab, args.hidden, std=0.05).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    coef = torch.randn(args.tokens, generator=g).to(device)
    return hidden, weight, targets, coef


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_path(path: str, hidden, weight, targets, coef, args: argparse.Namespace) -> torch.Tensor:
    hidden.grad = None
    weight.grad = None
    if path == "naive":
        logits = (hidden @ weight.t()) / args.temperature
        logp = selective_log_softmax(logits, targets)
        ent = entropy_from_logits(logits) if args.entropy else None
        del logits
    else:
        logp, ent = token_logprobs(hidden, weight, targets, args.temperature, args.chunk_size, args.entropy)
    obj = (logp * coef).sum()
    if ent is not None:
        obj = obj + ent.sum()
    obj.backward()
    return logp.detach()


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> dict:
    """Measure one path in this process (CPU: call in a fresh subprocess)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    hidden, weight, targets, coef = make_inputs(args, device)
    if device.type == "cuda":
        for _ in range(args.warmup):
            run_path(args.path, hidden, weight, targets, coef, args)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss_bytes()
    times = []
    logp = None
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logp = run_path(args.path, hidden, weight, targets, coef, args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    assert logp is not None and hidden.grad is not None and weight.grad is not None
    return {
        "path": args.path,
        "peak_bytes": int(peak),
        "time_s": min(times),
        "logp_sum": float(logp.double().sum()),
        "grad_hidden_norm": float(hidden.grad.double().norm()),
        "grad_weight_norm": float(weight.grad.double().norm()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (V=32,000, H=256, 4,096 tokens)")
    p.add_argument("--tokens", type=int, default=4 * 1024, help="tokens (default 4 x 1,024)")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary (Qwen2.5: 151,936)")
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (Qwen2.5-1.5B: 1536)")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--entropy", action="store_true", help="also compute entropies (objective adds their sum)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of hidden/weight")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (min is reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (CUDA only)")
    p.add_argument("--path", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is steadier on a shared machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.vocab, args.hidden = 4096, 32_000, 256
    cuda = args.device.startswith("cuda")
    if args.repeats is None:
        args.repeats = 3 if (cuda or args.quick) else 1
    if args.warmup is None:
        args.warmup = 1 if cuda else 0

    if args.path is not None:  # worker mode
        print(json.dumps(worker(args)))
        return

    results = {}
    for path in ("naive", "chunked"):
        if cuda:
            args.path = path
            results[path] = worker(args)
        else:
            # A fresh process per path: RSS peaks never go down, so they cannot share one.
            cmd = [sys.executable, __file__, "--path", path] + [a for a in sys.argv[1:]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[path] = json.loads(out.stdout.strip().splitlines()[-1])

    dev = torch.cuda.get_device_name(args.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; tokens {args.tokens}, vocab {args.vocab}, hidden {args.hidden}, "
          f"dtype {args.dtype}, chunk {args.chunk_size}, T {args.temperature}, entropy {args.entropy}; "
          "forward + backward")
    print(f"memory: {'max_memory_allocated' if cuda else 'peak RSS (fresh process)'} above the inputs")
    print()
    print("| path    | peak MiB | time s | logp sum       | grad h norm | grad W norm |")
    print("|---------|---------:|-------:|---------------:|------------:|------------:|")
    for path, r in results.items():
        print(f"| {path:<7} | {r['peak_bytes'] / 2**20:8.0f} | {r['time_s']:6.2f} | {r['logp_sum']:14.4f} "
              f"| {r['grad_hidden_norm']:11.6f} | {r['grad_weight_norm']:11.6f} |")
    ratio = results["chunked"]["peak_bytes"] / max(results["naive"]["peak_bytes"], 1)
    speed = results["naive"]["time_s"] / results["chunked"]["time_s"]
    print()
    print(f"chunked / naive peak memory: {ratio:.3f} (target <= 0.25); naive / chunked time: {speed:.2f}x")


if __name__ == "__main__":
    main()
