"""Where one GRPO iteration of the CPU default spends its time.

    uv run python benchmarks/bench_iteration.py [--iterations 6] [--config configs/sat_tiny.yaml]

Runs ``fit`` on the config for a few iterations, evaluating after every one, then prints the
mean seconds per stage from the run's ``metrics/*.json``: generate (server round trips),
score (the environment's reward), train (every forward/backward/optimizer step of the
iteration), sync (saving the HF folder + ``update_weights_from_disk`` + verification) and
eval (the fixed eval set), next to the wall time per iteration. The first iteration is left
out of the means (one-off warm-up), and shown on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"generate": "time/generate_s", "score": "time/score_s", "train": "time/train_s", "sync": "time/sync_s"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "sat_tiny.yaml"))
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("overrides", nargs="*", help="extra fit arguments, e.g. --model.share_prompts false")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpo_lightning", "fit", "--config", args.config,
               "--trainer.max_epochs", str(args.iterations), "--data.eval.interval", "1",
               "--trainer.logger.init_args.save_dir", tmp, "--trainer.logger.init_args.name", "bench",
               "--trainer.enable_progress_bar", "false", *args.overrides]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        metrics = Path(tmp) / "bench" / "version_0" / "metrics"
        train = [json.loads((metrics / f"train_iter_{i:03d}.json").read_text()) for i in range(args.iterations)]
        evals = [json.loads((metrics / f"eval_iter_{i:03d}.json").read_text()) for i in range(args.iterations)]
        baseline = json.loads((metrics / "eval_baseline.json").read_text())

    rows = {name: [m[key] for m in train] for name, key in STAGES.items()}
    rows["eval"] = [e["time/eval_s"] for e in evals]
    print(f"config: {args.config} {' '.join(args.overrides)}")
    print(f"{args.iterations} iterations, whole command {wall:.1f}s (imports, server start, baseline eval "
          f"{baseline['time/eval_s']:.1f}s, checkpoints included)\n")
    print("| stage | first iteration (s) | mean of the others (s) | share |")
    print("|---|---|---|---|")
    means = {k: statistics.fmean(v[1:]) for k, v in rows.items()}
    total = sum(means.values())
    for name, values in rows.items():
        print(f"| {name} | {values[0]:.3f} | {means[name]:.3f} | {means[name] / total:.0%} |")
    print(f"| **sum** | {sum(v[0] for v in rows.values()):.3f} | {total:.3f} | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
