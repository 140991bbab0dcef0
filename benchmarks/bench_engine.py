"""The built-in server's batching engine, in-process: this tree against an earlier revision.

    uv run python benchmarks/bench_engine.py --baseline 01467c5   # any git revision

Loads ``grpo_lightning/inference/engine.py`` as it was at ``--baseline`` (``git show``) next to
the current one and runs the same workloads through both, interleaved, on the same model and
thread count; prints the median seconds of each and whether both produced the same tokens.
No HTTP: this isolates the engine (admission, KV-cache bookkeeping, sampling).

Workloads (tiny-sat prompts, temperature 1):
* ``grpo``: 16 prompts x ``n=8`` in one call, ending at EOS (tiny-sat answers in ~10 tokens);
* ``varied``: 128 sequences of 16-128 tokens (``min_tokens`` = ``max_tokens``), so rows leave
  the batch at many different steps, as long reasoning completions do;
* ``equal``: 64 distinct prompts x exactly 64 tokens, all leaving together.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from bench_server import sat_prompts  # this folder is on the path when a script runs

import grpo_lightning.inference.engine as current
from grpo_lightning.inference.protocol import SamplingOptions
from grpo_lightning.models import load_policy, load_tokenizer, resolve_model_path, stop_token_ids

ROOT = Path(__file__).resolve().parents[1]
ENGINE = "grpo_lightning/inference/engine.py"


def engine_at(revision: str, folder: Path) -> ModuleType:
    source = subprocess.run(["git", "show", f"{revision}:{ENGINE}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    # Relative imports point at the installed package, which the engine shares with the baseline.
    source = source.replace("from .", "from grpo_lightning.inference.")
    path = folder / "engine_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("engine_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def workloads(prompts: list[list[int]]) -> dict[str, list[tuple[list[int], SamplingOptions, int]]]:
    """(prompt, options, seed) per sequence; sequences with equal options go in one call."""
    eos = SamplingOptions(max_tokens=64, temperature=1.0)

    def exactly(m: int) -> SamplingOptions:
        return SamplingOptions(max_tokens=m, min_tokens=m, temperature=1.0)

    return {
        "grpo (16 x n=8, EOS)": [(prompts[i // 8], eos, i) for i in range(128)],
        "varied (128 x 16-128 tok)": [(prompts[i // 8], exactly(16 + (i * 37) % 113), i) for i in range(128)],
        "equal (64 x 64 tok)": [(prompts[i], exactly(64), i) for i in range(64)],
    }


def run(module: ModuleType, model, stops: list[int], work, max_batch: int) -> tuple[float, list[list[int]]]:
    engine = module.GenerationEngine(model, stops, max_batch_size=max_batch)
    engine.start()

    async def go():
        calls: dict[int, list[int]] = {}
        for i, (_, options, _) in enumerate(work):
            calls.setdefault(id(options), []).append(i)
        start = time.perf_counter()
        results = await asyncio.gather(*(
            engine.generate([work[i][0] for i in idx], work[idx[0]][1], [work[i][2] for i in idx])
            for idx in calls.values()
        ))
        seconds = time.perf_counter() - start
        tokens: list[list[int]] = [[] for _ in work]
        for idx, outs in zip(calls.values(), results, strict=True):
            for i, out in zip(idx, outs, strict=True):
                tokens[i] = out.token_ids
        return seconds, tokens

    try:
        return asyncio.run(go())
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision whose engine.py to compare with")
    parser.add_argument("--model", default="tiny-sat")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's default on 2 cores)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the first is a warm-up")
    parser.add_argument("--max-batch", type=int, default=128)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    prompts = sat_prompts(tokenizer, 64)
    model, stops = load_policy(path), stop_token_ids(tokenizer, path)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = engine_at(args.baseline, Path(tmp))
        print(f"\nengine: this tree vs {args.baseline}, {args.model}, {args.threads} thread(s), "
              f"median of {args.repeats - 1} interleaved rounds\n")
        print(f"| {'workload':<26} | {'tokens':>6} | {'baseline s':>10} | {'current s':>9} | {'speedup':>7} | same tokens |")
        print(f"|{'-' * 28}|{'-' * 8}|{'-' * 12}|{'-' * 11}|{'-' * 9}|-------------|")
        for name, work in workloads(prompts).items():
            times: dict[str, list[float]] = {"baseline": [], "current": []}
            outputs = {}
            for _ in range(args.repeats):
                for label, module in (("baseline", baseline), ("current", current)):
                    seconds, outputs[label] = run(module, model, stops, work, args.max_batch)
                    times[label].append(seconds)
            b, c = (statistics.median(times[k][1:]) for k in ("baseline", "current"))
            tokens = sum(len(t) for t in outputs["current"])
            same = "yes" if outputs["baseline"] == outputs["current"] else "NO"
            print(f"| {name:<26} | {tokens:>6} | {b:>10.3f} | {c:>9.3f} | {b / c:>6.2f}x | {same:>11} |")


if __name__ == "__main__":
    main()
