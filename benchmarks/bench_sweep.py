"""Compute of a sweep with and without pruning, and wall time with one worker against two.

    uv run python benchmarks/bench_sweep.py --part pruning      # CPU-seconds: no lock needed
    flock /work/notes/bench.lock timeout 1500 uv run python benchmarks/bench_sweep.py --part workers

Searches ``model.lr`` (log-uniform 1e-4..3e-3) x ``data.temperature`` (uniform 0.6..1.2) on the
CPU default (configs/sat_tiny.yaml) with short runs (``--iterations``, an eval of
``--eval-problems`` problems x 2 every ``--interval`` iterations, no baseline eval).

``--part pruning``: random without pruning, random + ASHA and TPE + ASHA, one worker
(``--parallel 1``) each, the three at the same time (``--one-by-one`` to run them in turn):
CPU-seconds are what is compared, and they do not depend on what else runs. The random
sampler is seeded per trial number, so both random searches draw the same points: the table
says which trials ASHA stopped and where the unpruned search's best was. The eval noise is
measured twice: the binomial standard error of one eval, and the spread of consecutive evals of
one run late in training (iterations ``--iterations`` - 2 x interval .. ``--iterations``).

``--part workers``: the random search without pruning with one worker, then with two (two sweep
processes on one journal, ``--parallel 1`` each), for wall time: run it under the bench lock.

CPU-seconds: user + system time of the sweep processes and everything they waited for (their
fork server, the ``fit`` runs and their inference servers), from ``wait4``; "CPU-s (trials)" is
the sum of the trials' own ``cpu_s`` column.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRUNING = {"random": ["--sampler", "random"], "random-asha": ["--sampler", "random", "--pruner", "asha"],
           "tpe-asha": ["--sampler", "tpe", "--pruner", "asha"]}
SPACE = ["--sample", "model.lr=loguniform:1e-4:3e-3", "--sample", "data.temperature=uniform:0.6:1.2"]


def fit_args(iterations: int, interval: int, eval_problems: int) -> list[str]:
    """The sat_tiny run shrunk to a few CPU-seconds per iteration. The baseline eval is off: it
    is neither the objective nor reported to the pruner."""
    return ["--trainer.max_epochs", str(iterations), "--data.eval.interval", str(interval),
            "--data.eval.num_problems", str(eval_problems), "--data.eval.replicates", "2",
            "--data.eval.baseline", "false",
            "--data.problems_per_iteration", "8", "--data.rollouts_per_problem", "4",
            "--data.dynamic_sampling", "false", "--model.num_iterations", "1", "--model.steps_per_iteration", "4",
            "--model.micro_batch_size", "8", "--model.warmup_steps", "4",
            "--checkpoint.save_interval", "1000", "--checkpoint.keep_last", "1"]


def start(root: Path, name: str, workers: int, extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "grpo_lightning", "sweep", "--config", str(ROOT / "configs" / "sat_tiny.yaml"),
           *SPACE, "--trials", str(args.trials), "--seed", str(args.seed), "--parallel", "1",
           "--root", str(root), "--name", name, *extra, "--", *fit_args(args.iterations, args.interval, args.eval_problems)]
    print("$ " + shlex.join(cmd[1:]) + (f"   (x{workers} workers)" if workers > 1 else ""), flush=True)
    procs = []
    t0 = time.monotonic()
    for i in range(workers):
        log = open(root / f"{name}.worker{i}.log", "wb")  # noqa: SIM115 - closed in finish()
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
        time.sleep(1.0 if i == 0 else 0)  # the first creates the study
    return {"name": name, "workers": workers, "t0": t0, "procs": procs, "dir": root / name}


def finish(run: dict) -> dict:
    cpu = 0.0
    for proc, log in run["procs"]:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
        log.close()
    wall = time.monotonic() - run["t0"]
    with (run["dir"] / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    finished = [r for r in rows if r["final_success_rate"] != "" and r["state"] == "complete"]
    best = max(finished, key=lambda r: (float(r["final_success_rate"]), float(r["final_reward_mean"])), default=None)
    return {**run, "wall": wall, "cpu": cpu, "rows": rows, "best": best,
            "trial_cpu": sum(float(r["cpu_s"] or 0) for r in rows),
            "complete": sum(r["state"] == "complete" for r in rows), "pruned": sum(r["state"] == "pruned" for r in rows),
            "failed": sum(r["state"] == "failed" for r in rows), "exit": [p.returncode for p, _ in run["procs"]],
            "iters": sum(int(r["final_iteration"]) + 1 for r in rows if r["final_iteration"] != "")}


def curve(run: dict, row: dict) -> dict[int, dict]:
    """A trial's evals by iteration (1-based: the step reported to the pruner)."""
    metrics = run["dir"] / row["run_dir"] / "metrics"
    return {int(p.stem.rsplit("_", 1)[1]) + 1: json.loads(p.read_text()) for p in sorted(metrics.glob("eval_iter_*.json"))}


def se(p: float, n: float) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def table(results: list[dict]) -> None:
    print("\n| search | workers | wall s | CPU-s (all) | CPU-s (trials) | iterations run | complete / pruned / failed "
          "| best final success (± SE) | found by | lr | temperature |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
    for r in results:
        b = r["best"]
        head = (f"| {r['name']} | {r['workers']} | {r['wall']:.0f} | {r['cpu']:.0f} | {r['trial_cpu']:.0f} | {r['iters']} "
                f"| {r['complete']} / {r['pruned']} / {r['failed']} ")
        if b is None:
            print(head + "| - | - | - | - |")
            continue
        n = curve(r, b)[int(b["final_iteration"]) + 1]["num_completions"]
        p = float(b["final_success_rate"])
        print(head + f"| {p:.4f} ± {se(p, n):.3f} | trial {b['trial']} | {float(b['model.lr']):.3g} "
              f"| {float(b['data.temperature']):.3g} |")
    print("exit codes: " + ", ".join(f"{r['name']} {r['exit']}" for r in results))


def noise(run: dict, args: argparse.Namespace) -> None:
    """How far apart consecutive evals of one run are late in training, against the binomial
    standard error of one eval: the noise a pruner ranks on."""
    late = [args.iterations - 2 * args.interval, args.iterations - args.interval, args.iterations]
    diffs, ses = [], []
    for row in run["rows"]:
        if row["state"] != "complete":
            continue
        c = curve(run, row)
        values = [c[i]["success_rate"] for i in late if i in c]
        diffs += [b - a for a, b in zip(values, values[1:], strict=False)]
        ses += [se(c[i]["success_rate"], c[i]["num_completions"]) for i in late if i in c]
    if len(diffs) > 1:
        print(f"\neval noise ({run['name']}, {len(ses)} late evals of {args.eval_problems} problems x 2): binomial SE "
              f"{statistics.mean(ses):.3f} (mean); consecutive evals {args.interval} iterations apart (iterations "
              f"{late[0]}..{late[-1]}) differ by {statistics.stdev(diffs):.3f} (std of {len(diffs)} differences; "
              f"{statistics.stdev(diffs) / math.sqrt(2):.3f} per eval if the runs stood still)")


def pruning_vs_unpruned(results: list[dict], args: argparse.Namespace) -> None:
    """For each pruned search: what it stopped, against the unpruned search's trials of the same
    points (the random sampler draws the same points in both)."""
    base = next((r for r in results if r["name"] == "random"), None)
    if base is None or base["best"] is None:
        return
    by_trial = {r["trial"]: r for r in base["rows"]}
    order = sorted(base["rows"], key=lambda r: -float(r["final_success_rate"] or -1))
    print("\nunpruned search, final success by trial: " + ", ".join(
        f"{r['trial']}: {float(r['final_success_rate']):.3f}" for r in order if r["final_success_rate"]))
    for r in results:
        if r is base or not r["pruned"]:
            continue
        stopped = [row for row in r["rows"] if row["state"] == "pruned"]
        text = ", ".join(f"trial {row['trial']} at iteration {int(row['final_iteration']) + 1}" for row in stopped)
        print(f"{r['name']}: CPU-s {r['cpu']:.0f} = {r['cpu'] / base['cpu']:.2f}x the unpruned search's; stopped {text}")
        if r["name"].startswith("random"):
            best = base["best"]["trial"]
            kept = next(row for row in r["rows"] if row["trial"] == best)
            print(f"  the unpruned search's best (trial {best}, {float(by_trial[best]['final_success_rate']):.3f}) "
                  f"is {kept['state']} here")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("pruning", "workers"), default="pruning")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--eval-problems", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="keep the sweeps here (default: a temporary dir)")
    p.add_argument("--ways", default=None, help="--part pruning: which searches, comma-separated "
                   f"(default: {','.join(PRUNING)})")
    p.add_argument("--one-by-one", action="store_true", help="--part pruning: run the searches in turn")
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_sweep_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{args.part}: {args.trials} trials of {args.iterations} iterations, eval of {args.eval_problems} problems "
          f"x 2 every {args.interval}; {len(os.sched_getaffinity(0))} cores; sweeps in {root}", flush=True)
    t0 = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if args.part == "pruning":
        ways = (args.ways or ",".join(PRUNING)).split(",")
        if args.one_by_one:
            results = [finish(start(root, w, 1, PRUNING[w], args)) for w in ways]
        else:
            results = [finish(run) for run in [start(root, w, 1, PRUNING[w], args) for w in ways]]
    else:
        results = [finish(start(root, "random-1worker", 1, [], args))]
        results.append(finish(start(root, "random-2workers", 2, [], args)))
    print(f"\n{t0} .. {time.strftime('%H:%M:%S', time.gmtime())} UTC; load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    table(results)
    if args.part == "pruning":
        pruning_vs_unpruned(results, args)
        noise(next((r for r in results if r["name"] == "random"), results[0]), args)
    else:
        a, b = results
        print(f"\ntwo workers: {b['wall']:.0f} s against {a['wall']:.0f} s for one ({b['wall'] / a['wall']:.2f}x)")


if __name__ == "__main__":
    main()
