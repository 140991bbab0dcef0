"""Built-in server: batched vs one-at-a-time throughput, and weight sync vs a full restart.

    uv run python benchmarks/bench_server.py                 # tiny-sat on CPU
    uv run python benchmarks/bench_server.py --device cuda --model /path/to/hf-folder

Prints one table. Throughput: ``--completions`` completions of exactly ``--tokens`` tokens
(``min_tokens`` keeps EOS away), one request per completion with distinct prompts, sent one
at a time and then all at once (the server batches them); plus the GRPO shape, groups of
``--group`` completions of one prompt per request (``n``), which also share the prompt's
prefill. Weight sync: pushing a checkpoint with ``update_weights_from_disk`` vs stopping and
starting the server on it (how the system we replace syncs), both verified by checksum.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from grpo_lightning.envs.sat import SATEnv
from grpo_lightning.inference.client import GenerationRequest, SamplingParams
from grpo_lightning.inference.launch import ManagedServer, ServerConfig
from grpo_lightning.inference.weight_sync import sync_weights
from grpo_lightning.models import load_tokenizer, resolve_model_path


def sat_prompts(tokenizer, count: int) -> list[list[int]]:
    env = SATEnv()
    texts = [
        tokenizer.apply_chat_template(env.reset(s), add_generation_prompt=True, tokenize=False)
        for s in range(count)
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def timed_generate(client, requests) -> tuple[float, int]:
    start = time.perf_counter()
    results = client.generate(requests)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for group in results for c in group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sat")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--completions", type=int, default=64)
    parser.add_argument(
        "--serial-completions",
        type=int,
        default=None,
        help="completions sent one at a time (default: --completions); fewer keeps a large model's serial round short",
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="completions per prompt, GRPO row")
    parser.add_argument("--sync-repeats", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each throughput path")
    parser.add_argument(
        "--threads", type=int, default=None, help="server torch CPU threads (default: its own)"
    )
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    prompts = sat_prompts(tokenizer, args.completions)
    params = SamplingParams(max_tokens=args.tokens, min_tokens=args.tokens)
    requests = [
        GenerationRequest(prompt_ids=p, n=1, seed=i, params=params) for i, p in enumerate(prompts)
    ]
    serial = requests[: args.serial_completions or args.completions]
    groups = [
        GenerationRequest(prompt_ids=p, n=args.group, seed=args.group * i, params=params)
        for i, p in enumerate(prompts[: args.completions // args.group])
    ]
    extra = ["--num-threads", str(args.threads)] if args.threads else []
    config = ServerConfig(
        device=args.device, max_num_seqs=args.completions, startup_timeout=600, extra_args=extra
    )

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        shutil.copytree(path, checkpoint)
        with ManagedServer(config, model=path, log_path=Path(tmp) / "server.log") as server:
            info = server.client().generate(requests[:2])  # warm caches before timing
            assert all(len(c.token_ids) == args.tokens for group in info for c in group)
            # Interleaved repeats, median: the first batch of a new shape pays one-off
            # allocations, and load from elsewhere should hit every path alike.
            runs: dict[str, list[tuple[float, int]]] = {"batched": [], "serial": [], "grpo": []}
            for _ in range(args.repeats):
                runs["batched"].append(
                    timed_generate(server.client(max_concurrency=args.completions), requests)
                )
                runs["serial"].append(timed_generate(server.client(max_concurrency=1), serial))
                runs["grpo"].append(timed_generate(server.client(), groups))
            (batched_s, batched_tokens), (serial_s, serial_tokens), (grpo_s, grpo_tokens) = (
                (statistics.median(s for s, _ in runs[k]), runs[k][0][1])
                for k in ("batched", "serial", "grpo")
            )
            assert batched_tokens == grpo_tokens == args.completions * args.tokens
            assert serial_tokens == len(serial) * args.tokens
            disk = [
                sync_weights(server, checkpoint, method="disk") for _ in range(args.sync_repeats)
            ]
            restart = [
                sync_weights(server, checkpoint, method="restart")
                for _ in range(max(1, args.sync_repeats // 2))
            ]
            assert all(r.verified for r in disk + restart)

    disk_s = statistics.median(r.seconds for r in disk)
    restart_s = statistics.median(r.seconds for r in restart)
    n = args.completions
    print(
        f"\nbuilt-in server, {args.model}, device={args.device}: {n} completions x {args.tokens} tokens\n"
    )
    print(
        f"| {'throughput':<28} | {'seconds':>8} | {'completions/s':>13} | {'tokens/s':>9} | {'speedup':>7} |"
    )
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 15}|{'-' * 11}|{'-' * 9}|")
    rows = [
        ("one at a time", serial_s, len(serial), serial_tokens),
        (f"batched ({n} concurrent)", batched_s, n, batched_tokens),
        (
            f"batched ({len(groups)} x n={args.group})",
            grpo_s,
            len(groups) * args.group,
            grpo_tokens,
        ),
    ]
    for label, s, count, toks in rows:
        speedup = (toks / s) / (serial_tokens / serial_s)
        print(
            f"| {label:<28} | {s:>8.2f} | {count / s:>13.1f} | {toks / s:>9.0f} | {speedup:>6.1f}x |"
        )
    print()
    print(f"| {'weight sync (verified)':<28} | {'seconds':>8} | {'speedup':>7} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 9}|")
    for label, s in [("full server restart", restart_s), ("update_weights_from_disk", disk_s)]:
        print(f"| {label:<28} | {s:>8.3f} | {restart_s / s:>6.1f}x |")


if __name__ == "__main__":
    main()
