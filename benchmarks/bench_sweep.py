"""Compute and wall time of a sweep: random search, random + ASHA, TPE + ASHA; one worker vs two.

    uv run python benchmarks/bench_sweep.py [--trials 6] [--iterations 10] [--interval 2]

Searches ``model.lr`` (log-uniform 1e-4..3e-3) x ``data.temperature`` (uniform 0.6..1.2) on the
CPU default (configs/sat_tiny.yaml) with short runs (``--iterations``, an eval of
``--eval-problems`` problems every ``--interval`` iterations), four ways, one after the other:

- random, no pruning, one worker with ``--parallel 1``;
- random, no pruning, two workers (two sweep processes on one journal, ``--parallel 1`` each):
  the same trials as the line above (the sampler is seeded per trial number), so the pair also
  shows the run-to-run spread of identical searches;
- random + ASHA and TPE + ASHA, two workers each.

For each: wall seconds, CPU-seconds (user + system of the sweep processes and everything they
waited for: the ``fit`` runs and their inference servers, from ``wait4``), trials complete /
pruned / failed, and the best final eval success with the trial that found it.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAYS = {"random-1worker": (1, []), "random-2workers": (2, []), "random-asha": (2, ["--pruner", "asha"]),
        "tpe-asha": (2, ["--sampler", "tpe", "--pruner", "asha"])}
SPACE = ["--sample", "model.lr=loguniform:1e-4:3e-3", "--sample", "data.temperature=uniform:0.6:1.2"]


def fit_args(iterations: int, interval: int, eval_problems: int) -> list[str]:
    """The sat_tiny run shrunk to a few CPU-seconds per iteration."""
    return ["--trainer.max_epochs", str(iterations), "--data.eval.interval", str(interval),
            "--data.eval.num_problems", str(eval_problems), "--data.eval.replicates", "2",
            "--data.problems_per_iteration", "8", "--data.rollouts_per_problem", "4",
            "--data.dynamic_sampling", "false", "--model.num_iterations", "2", "--model.steps_per_iteration", "4",
            "--model.micro_batch_size", "8", "--model.warmup_steps", "4",
            "--checkpoint.save_interval", "1000", "--checkpoint.keep_last", "1"]


def sweep(root: Path, name: str, workers: int, extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "grpo_lightning", "sweep", "--config", str(ROOT / "configs" / "sat_tiny.yaml"),
           *SPACE, "--trials", str(args.trials), "--seed", str(args.seed), "--parallel", "1",
           "--root", str(root), "--name", name, *extra, "--", *fit_args(args.iterations, args.interval, args.eval_problems)]
    print("$ " + shlex.join(cmd[1:]) + (f"   (x{workers} workers)" if workers > 1 else ""), flush=True)
    t0 = time.monotonic()
    procs = []
    for i in range(workers):
        log = open(root / f"{name}.worker{i}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
        time.sleep(1.0 if i == 0 else 0)  # the first creates the study
    cpu = 0.0
    for proc, log in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
        log.close()
    wall = time.monotonic() - t0
    with (root / name / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    finished = [r for r in rows if r["final_success_rate"] != "" and r["state"] == "complete"]
    best = max(finished, key=lambda r: (float(r["final_success_rate"]), float(r["final_reward_mean"])), default=None)
    return {"name": name, "workers": workers, "wall": wall, "cpu": cpu,
            "trial_cpu": sum(float(r["cpu_s"] or 0) for r in rows),
            "complete": sum(r["state"] == "complete" for r in rows), "pruned": sum(r["state"] == "pruned" for r in rows),
            "failed": sum(r["state"] == "failed" for r in rows), "exit": [p.returncode for p, _ in procs],
            "best": best, "iters": sum(int(r["final_iteration"]) + 1 for r in rows if r["final_iteration"] != "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--interval", type=int, default=2)
    p.add_argument("--eval-problems", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="keep the sweeps here (default: a temporary dir)")
    p.add_argument("--ways", default=",".join(WAYS), help="which searches, comma-separated, in order")
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_sweep_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{args.trials} trials of {args.iterations} iterations, eval of {args.eval_problems} problems x 2 every "
          f"{args.interval}; {len(os.sched_getaffinity(0))} cores; sweeps in {root}", flush=True)
    results = [sweep(root, name, *WAYS[name], args) for name in args.ways.split(",")]
    print("\n| search | workers | wall s | CPU-s (all) | CPU-s (trials) | iterations run | complete / pruned / failed "
          "| best final success | found by | lr | temperature |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
    for r in results:
        b = r["best"] or {}
        print(f"| {r['name']} | {r['workers']} | {r['wall']:.0f} | {r['cpu']:.0f} | {r['trial_cpu']:.0f} | {r['iters']} "
              f"| {r['complete']} / {r['pruned']} / {r['failed']} | {b.get('final_success_rate', '')} "
              f"| trial {b.get('trial', '-')} | {float(b['model.lr']):.3g} | {float(b['data.temperature']):.3g} |"
              if b else f"| {r['name']} | {r['workers']} | {r['wall']:.0f} | {r['cpu']:.0f} | - | - | - | - | - | - | - |")
    print("exit codes: " + ", ".join(f"{r['name']} {r['exit']}" for r in results))


if __name__ == "__main__":
    main()
