"""Generation that runs ahead of training: ``data.max_staleness`` 0 (synchronous) vs k >= 1.

    flock /work/notes/bench.lock timeout 1500 uv run python benchmarks/bench_async.py \
        [--iterations 20] [--seeds 0,1,2] [--parts a,b] [--proximal recompute,loglinear]

(a) The CPU default (configs/sat_tiny.yaml) with max_staleness 0 and 1, one run per seed each,
    interleaved (seed 0 k=0, seed 0 k=1, seed 1 k=0, ...) so that load hits both alike: wall
    time of the whole ``fit`` command and the final eval's success rate (the eval after the last
    iteration, 200 problems x 4). ``--iterations`` shortens the 120 of the config (the cosine
    schedule follows it). The runs are the config as the README runs it, baseline eval included.
(b) A generation-heavy shape: the same rollouts with one pass over them per iteration
    (``model.num_iterations 1`` instead of 4) so that generation and training take about the
    same time; k = 0, 1, 2 on seed 0, interleaved, no evaluation.
``--proximal recompute,loglinear`` runs every k >= 1 once per ``model.proximal_logprobs``
method, side by side: the exact start-of-iteration log-probabilities (one forward pass over
the rollouts per iteration on the trainer) against AReaL's interpolation (none).
(c) For every run, where the time of the training loop goes (from the first iteration's
    rollouts to the last iteration's metrics, per iteration): the trainer waiting for rollouts
    (``time/wait_rollouts_s``), training (``time/train_s``), the weight sync, and the server
    sitting idle (``time/server_idle_s``).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from bench_iteration import fit_run

from grpo_lightning.runfiles import read_evals, read_train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "sat_tiny.yaml")
HEAVY = ["--model.num_iterations", "1", "--data.eval.num_problems", "0"]


def fit(iterations: int, seed: int, k: int, extra: list[str]) -> dict[str, float]:
    overrides = ["--seed_everything", str(seed), "--data.max_staleness", str(k), *extra]
    with fit_run(CONFIG, iterations, overrides, f"seed {seed}, k={k}") as (run_dir, wall):
        train, evals = read_train(run_dir), read_evals(run_dir)
        success = evals[iterations]["success_rate"] if iterations in evals else float("nan")
        # The loop: from iteration 0's metrics file to the last one's (startup, the model load
        # and the first generation left out).
        files = [run_dir / "metrics" / f"train_iter_{i:03d}.json" for i in (0, iterations - 1)]
        loop = (files[1].stat().st_mtime - files[0].stat().st_mtime) / (iterations - 1)

    def mean(key: str) -> float:
        return statistics.fmean(m.get(key, 0.0) for m in train[1:])

    return {"wall": wall, "success": success, "loop": loop, "wait": mean("time/wait_rollouts_s"),
            "train": mean("time/train_s"), "generate": mean("time/generate_s"), "sync": mean("time/sync_s"),
            "idle": mean("time/server_idle_s"), "staleness": max(m["rollout/staleness_max"] for m in train)}


def row(name: str, r: dict[str, float]) -> str:
    return (f"| {name} | {r['wall']:.0f} | {r['success']:.3f} | {r['loop']:.2f} | {r['generate']:.2f} | {r['train']:.2f} | "
            f"{r['sync']:.2f} | {r['wait']:.2f} | {r['idle']:.2f} | {r['staleness']:.0f} |")


HEADER = ("| run | wall s | final success | s/iteration | generate s | train s | sync s | trainer waits s | "
          "server idle s | max staleness |\n|---|---|---|---|---|---|---|---|---|---|")


def variants(ks: list[int], proximal: list[str]) -> list[tuple[str, int, list[str]]]:
    """(label, k, overrides): k = 0 once; each k >= 1 once per proximal method."""
    out = []
    for k in ks:
        for method in (["recompute"] if k == 0 else proximal):
            label = f"k={k}" + (f" {method}" if k and len(proximal) > 1 else "")
            out.append((label, k, ["--model.proximal_logprobs", method] if k else []))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parts", default="b,a", help="b (the shorter) runs first")
    ap.add_argument("--ks", default="0,1", help="(a): the max_staleness values compared")
    ap.add_argument("--proximal", default="recompute",
                    help="runs with k >= 1: model.proximal_logprobs, one run per method (e.g. recompute,loglinear)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = set(args.parts.split(","))
    proximal = args.proximal.split(",")
    print(f"load average before: {os.getloadavg()}", flush=True)
    if "b" in parts:
        lines = [HEADER]
        heavy = {}
        for label, k, extra in variants([0, 1, 2], proximal):
            heavy[label] = fit(args.iterations, seeds[0], k, [*HEAVY, *extra])
            lines.append(row(f"(b) {label}", heavy[label]))
            print(lines[-1], flush=True)
        print(f"\n(b) generation-heavy shape ({' '.join(HEAVY)}), {args.iterations} iterations, seed {seeds[0]}")
        print("\n".join(lines))
        for label in heavy:
            if label != "k=0":
                print(f"speed-up {label} over k=0: whole run {heavy['k=0']['wall'] / heavy[label]['wall']:.2f}x, "
                      f"training loop {heavy['k=0']['loop'] / heavy[label]['loop']:.2f}x")
    if "a" in parts:
        runs = variants([int(k) for k in args.ks.split(",")], proximal)
        results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in runs}
        lines = [HEADER]
        for seed in seeds:
            for label, k, extra in runs:
                r = fit(args.iterations, seed, k, extra)
                results[label].append(r)
                lines.append(row(f"(a) seed {seed}, {label}", r))
                print(lines[-1], flush=True)
        print(f"\n(a) CPU default, {args.iterations} iterations, seeds {seeds}")
        print("\n".join(lines))
        walls = {k: statistics.fmean(r["wall"] for r in v) for k, v in results.items()}
        loops = {k: statistics.fmean(r["loop"] for r in v) for k, v in results.items()}
        for k, v in results.items():
            succ = [r["success"] for r in v]
            print(f"{k}: mean wall {walls[k]:.0f} s, loop {loops[k]:.2f} s/iteration, final success {succ} "
                  f"(spread {min(succ):.3f}..{max(succ):.3f})")
        for label in results:
            if label != "k=0" and "k=0" in results:
                print(f"speed-up {label} over k=0: whole run {walls['k=0'] / walls[label]:.2f}x, "
                      f"training loop {loops['k=0'] / loops[label]:.2f}x")
    print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
