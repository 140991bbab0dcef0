"""Where one GRPO iteration of the CPU default spends its time, with and without shared prompts.

    uv run python benchmarks/bench_iteration.py [--iterations 6] [--config configs/sat_tiny.yaml]
    uv run python benchmarks/bench_iteration.py --compare ""       # the config alone

Runs ``fit`` on the config for a few iterations, evaluating after every one, then prints the
mean seconds per stage from the run's ``metrics/*.json``: generate (server round trips),
score (the environment's reward), train (every forward/backward/optimizer step of the
iteration), sync (saving the HF folder + ``update_weights_from_disk`` + verification) and
eval (the fixed eval set). The first iteration is left out of the means (one-off warm-up).

The same is run a second time with ``--compare`` (default ``--model.share_prompts false``:
every completion's forward pass recomputes its prompt, the naive path), and both appear side
by side. The runs are sequential on the same machine with the same seed; their rollouts are
the same in iteration 0 only (the two paths round differently, so the weights drift apart),
hence the throughput row (training tokens per second) next to the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from grpo_lightning.runfiles import read_evals, read_train

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"generate": "time/generate_s", "score": "time/score_s", "train": "time/train_s", "sync": "time/sync_s"}


@contextlib.contextmanager
def fit_run(config: str, iterations: int, overrides: list[str], label: str) -> Iterator[tuple[Path, float]]:
    """Run ``fit`` for ``iterations`` into a temporary folder; yield its run folder and wall seconds.

    The folder (and its ``metrics/``) exists only inside the ``with`` block."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpo_lightning", "fit", "--config", config,
               "--trainer.max_epochs", str(iterations),
               "--trainer.logger.init_args.save_dir", tmp, "--trainer.logger.init_args.name", "bench",
               "--trainer.enable_progress_bar", "false", *overrides]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"fit failed ({label}):\n{proc.stderr[-3000:]}")
        yield Path(tmp) / "bench" / "version_0", wall


def run(config: str, iterations: int, overrides: list[str]) -> tuple[dict[str, float], float]:
    """Mean seconds per stage (iterations 1..N-1) and the whole command's wall time."""
    label = " ".join(overrides) or "config as is"
    with fit_run(config, iterations, ["--data.eval.interval", "1", *overrides], label) as (run_dir, wall):
        train, evals = read_train(run_dir), read_evals(run_dir)
    rows = {name: [m[key] for m in train] for name, key in STAGES.items()}
    rows["eval"] = [evals[i + 1]["time/eval_s"] for i in range(iterations)]
    means = {k: statistics.fmean(v[1:]) for k, v in rows.items()}
    # The runs' rollouts drift apart after iteration 0 (different float paths, different
    # weights), so compare training by throughput as well as by seconds.
    means["train tokens/s"] = statistics.fmean(m["train/tokens"] / m["time/train_s"] for m in train[1:])
    return means, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "sat_tiny.yaml"))
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--compare", default="--model.share_prompts false",
                    help="fit overrides of the second run ('' to skip it)")
    args = ap.parse_args()
    if args.iterations < 2:
        ap.error("--iterations must be at least 2 (the first one is warm-up)")

    plans = {"config": []}
    if args.compare.strip():
        plans[args.compare] = shlex.split(args.compare)
    results = {name: run(args.config, args.iterations, overrides) for name, overrides in plans.items()}

    print(f"config: {Path(args.config).name}; {args.iterations} iterations per run, eval after each; "
          f"mean seconds per iteration over iterations 1..{args.iterations - 1}\n")
    names = list(results)
    print("| stage | " + " | ".join(f"{n} (s)" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    stages = [*STAGES, "eval"]
    for stage in stages:
        print(f"| {stage} | " + " | ".join(f"{results[n][0][stage]:.3f}" for n in names) + " |")
    print("| **sum** | " + " | ".join(f"{sum(results[n][0][k] for k in stages):.3f}" for n in names) + " |")
    print("| train tokens/s | " + " | ".join(f"{results[n][0]['train tokens/s']:,.0f}" for n in names) + " |")
    print("| whole command (s) | " + " | ".join(f"{results[n][1]:.1f}" for n in names) + " |")
    if len(names) == 2:
        a, b = (results[n][0]["train tokens/s"] for n in names)
        print(f"\ntrain throughput: config / {names[1]} = {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
