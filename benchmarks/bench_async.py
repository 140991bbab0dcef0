"""Generation that runs ahead of training: ``data.max_staleness`` 0 (synchronous) vs k >= 1.

    flock /work/notes/bench.lock timeout 1500 uv run python benchmarks/bench_async.py \
        [--iterations 20] [--seeds 0,1,2] [--parts a,b]

(a) The CPU default (configs/sat_tiny.yaml) with max_staleness 0 and 1, one run per seed each,
    interleaved (seed 0 k=0, seed 0 k=1, seed 1 k=0, ...) so that load hits both alike: wall
    time of the whole ``fit`` command and the final eval's success rate (the eval after the last
    iteration, 200 problems x 4). ``--iterations`` shortens the 120 of the config (the cosine
    schedule follows it). The runs are the config as the README runs it, baseline eval included.
(b) A generation-heavy shape: the same rollouts with one pass over them per iteration
    (``model.num_iterations 1`` instead of 4) so that generation and training take about the
    same time; k = 0, 1, 2 on seed 0, interleaved, no evaluation.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parts", default="b,a", help="b (the shorter) runs first")
    ap.add_argument("--ks", default="0,1", help="(a): the max_staleness values compared")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = set(args.parts.split(","))
    print(f"load average before: {os.getloadavg()}", flush=True)
    if "b" in parts:
        lines = [HEADER]
        heavy = {}
        for k in (0, 1, 2):
            heavy[k] = fit(args.iterations, seeds[0], k, HEAVY)
            lines.append(row(f"(b) k={k}", heavy[k]))
            print(lines[-1], flush=True)
        print(f"\n(b) generation-heavy shape ({' '.join(HEAVY)}), {args.iterations} iterations, seed {seeds[0]}")
        print("\n".join(lines))
        for k in (1, 2):
            print(f"speed-up k={k} over k=0: whole run {heavy[0]['wall'] / heavy[k]['wall']:.2f}x, "
                  f"training loop {heavy[0]['loop'] / heavy[k]['loop']:.2f}x")
    if "a" in parts:
        ks = [int(k) for k in args.ks.split(",")]
        results: dict[int, list[dict[str, float]]] = {k: [] for k in ks}
        lines = [HEADER]
        for seed in seeds:
            for k in ks:
                r = fit(args.iterations, seed, k, [])
                results[k].append(r)
                lines.append(row(f"(a) seed {seed}, k={k}", r))
                print(lines[-1], flush=True)
        print(f"\n(a) CPU default, {args.iterations} iterations, seeds {seeds}")
        print("\n".join(lines))
        walls = {k: statistics.fmean(r["wall"] for r in v) for k, v in results.items()}
        loops = {k: statistics.fmean(r["loop"] for r in v) for k, v in results.items()}
        for k, v in results.items():
            succ = [r["success"] for r in v]
            print(f"k={k}: mean wall {walls[k]:.0f} s, loop {loops[k]:.2f} s/iteration, final success {succ} "
                  f"(spread {min(succ):.3f}..{max(succ):.3f})")
        if 0 in results and 1 in results:
            print(f"speed-up k=1 over k=0: whole run {walls[0] / walls[1]:.2f}x, training loop {loops[0] / loops[1]:.2f}x")
    print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
