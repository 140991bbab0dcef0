"""Compute of a sweep with and without pruning, and wall time with one worker against two.

    uv run python benchmarks/bench_sweep.py --part pruning      # CPU-seconds: no lock needed
    flock /work/notes/bench.lock timeout 1500 uv run python benchmarks/bench_sweep.py --part workers
    uv run python benchmarks/bench_sweep.py --part startup      # a trial's fixed cost, CPU-seconds

Searches ``model.lr`` (log-uniform 1e-4..3e-3) x ``data.temperature`` (uniform 0.6..1.2) on the
CPU default (configs/sat_tiny.yaml) with short runs: ``--iterations`` (30) iterations of
``--problems`` (4) problems x 4 rollouts, ``--passes`` (1) x ``--steps`` (2) optimizer steps,
an eval of ``--eval-problems`` (32) problems x 2 every ``--interval`` (5) iterations, no
baseline eval (``--baseline`` keeps it). The previous run's shape: ``--trials 6 --iterations 10
--interval 2 --eval-problems 16 --problems 8 --passes 2 --steps 4 --baseline``.

``--part pruning``: random without pruning, random + ASHA and TPE + ASHA, one worker
(``--parallel 1``) each, the three at the same time (``--one-by-one`` to run them in turn):
CPU-seconds are what is compared, and they do not depend on what else runs. The random
sampler is seeded per trial number, so both random searches draw the same points: the table
says which trials ASHA stopped and where the unpruned search's best was. The eval noise is
measured twice: the binomial standard error of one eval, and the spread of consecutive evals of
one run late in training (iterations ``--iterations`` - 2 x interval .. ``--iterations``).

``--part workers``: the random search without pruning with one worker, then with two (two sweep
processes on one journal, ``--parallel 1`` each), for wall time: run it under the bench lock.

``--part startup``: where a trial's fixed cost goes. The imports of a fresh ``fit`` process
and of the built-in server's, each in a fresh interpreter; a ``fit`` run of one tiny iteration
(2 problems x 2 rollouts, evals of 4 problems) started as a fresh process, against the same run
as a sweep trial forked from the worker's fork server (two trials: the ``cpu_s`` of each, and
the whole sweep process with its validation and its fork server), and the same two trials with
their built-in server started as a fresh process instead of the one each trial pre-forks
(``--data.server.python`` set to another path to this interpreter turns the pre-fork off).

CPU-seconds: user + system time of the sweep processes and everything they waited for (their
fork server, the ``fit`` runs and their inference servers), from ``wait4``; "CPU-s (trials)" is
the sum of the trials' own ``cpu_s`` column.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpo_lightning.runfiles import read_evals

ROOT = Path(__file__).resolve().parents[1]
PRUNING = {"random": ["--sampler", "random"], "random-asha": ["--sampler", "random", "--pruner", "asha"],
           "tpe-asha": ["--sampler", "tpe", "--pruner", "asha"]}
SPACE = ["--sample", "model.lr=loguniform:1e-4:3e-3", "--sample", "data.temperature=uniform:0.6:1.2"]


def fit_args(args: argparse.Namespace) -> list[str]:
    """The sat_tiny run shrunk to a few CPU-seconds per iteration. The baseline eval is off
    unless ``--baseline``: it is neither the objective nor reported to the pruner."""
    return ["--trainer.max_epochs", str(args.iterations), "--data.eval.interval", str(args.interval),
            "--data.eval.num_problems", str(args.eval_problems), "--data.eval.replicates", "2",
            "--data.eval.baseline", str(args.baseline).lower(),
            "--data.problems_per_iteration", str(args.problems), "--data.rollouts_per_problem", "4",
            "--data.dynamic_sampling", "false", "--model.num_iterations", str(args.passes),
            "--model.steps_per_iteration", str(args.steps), "--model.micro_batch_size", "8",
            "--model.warmup_steps", str(args.steps), "--checkpoint.save_interval", "1000", "--checkpoint.keep_last", "1"]


def start(root: Path, name: str, workers: int, extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "grpo_lightning", "sweep", "--config", str(ROOT / "configs" / "sat_tiny.yaml"),
           *SPACE, "--trials", str(args.trials), "--seed", str(args.seed), "--parallel", "1",
           "--root", str(root), "--name", name, *extra, "--", *fit_args(args)]
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
    """A trial's evals by step (iteration + 1: the step reported to the pruner; 0 the baseline)."""
    return read_evals(run["dir"] / row["run_dir"])


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


TINY = ["--trainer.max_epochs", "1", "--data.problems_per_iteration", "2", "--data.rollouts_per_problem", "2",
        "--data.eval.num_problems", "4", "--data.eval.replicates", "2", "--data.max_tokens", "8",
        "--checkpoint.keep_last", "1", "--model.num_iterations", "1", "--model.steps_per_iteration", "1",
        "--data.dynamic_sampling", "false"]


def cpu_of(cmd: list[str], log: Path) -> float:
    """CPU-seconds of a command and everything it waited for."""
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {shlex.join(cmd)} (see {log})")
    return usage.ru_utime + usage.ru_stime


def startup(root: Path, rounds: int) -> None:
    py, config = sys.executable, str(ROOT / "configs" / "sat_tiny.yaml")
    server = ("import torch, uvicorn; from grpo_lightning.models import load_policy, load_tokenizer; "
              "from grpo_lightning.inference.engine import GenerationEngine; import grpo_lightning.inference.server")
    rows: dict[str, list[float]] = {}
    for i in range(rounds):  # interleaved, so that the load hits each alike
        rows.setdefault("import grpo_lightning.cli (what a fresh fit imports)", []).append(
            cpu_of([py, "-c", "import grpo_lightning.cli"], root / f"import{i}.log"))
        rows.setdefault("the built-in server's imports", []).append(cpu_of([py, "-c", server], root / f"server{i}.log"))
        rows.setdefault("fit, 1 tiny iteration, fresh process (as trials ran before)", []).append(
            cpu_of([py, "-m", "grpo_lightning", "fit", "--config", config, *TINY, "--trainer.logger.init_args.save_dir",
                    str(root / f"fresh{i}")], root / f"fresh{i}.log"))
        name = f"forked{i}"
        total = cpu_of([py, "-m", "grpo_lightning", "sweep", "--config", config, "--grid", "seed_everything=0,1",
                        "--root", str(root), "--name", name, "--", *TINY], root / f"{name}.log")
        with (root / name / "summary.csv").open() as f:
            trials = [float(r["cpu_s"]) for r in csv.DictReader(f)]
        rows.setdefault("fit, 1 tiny iteration, forked trial, its server pre-forked (as trials run now)", []).extend(trials)
        rows.setdefault("the sweep of those 2 trials, all processes", []).append(total)
        # The same trials with their built-in server started as a fresh process: another path to
        # this interpreter is "another interpreter" to the launcher, which then never uses the
        # process the trial pre-forked (inference/prefork.py).
        name = f"fresh-server{i}"
        alias = str(Path(py).with_name("python3" if Path(py).name != "python3" else "python"))
        cpu_of([py, "-m", "grpo_lightning", "sweep", "--config", config, "--grid", "seed_everything=0,1",
                "--root", str(root), "--name", name, "--", *TINY, "--data.server.python", alias], root / f"{name}.log")
        with (root / name / "summary.csv").open() as f:
            trials = [float(r["cpu_s"]) for r in csv.DictReader(f)]
        rows.setdefault("fit, 1 tiny iteration, forked trial, its server a fresh process", []).extend(trials)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| what | CPU-s (each measurement) | mean |\n|---|---|---:|")
    for what, values in rows.items():
        print(f"| {what} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.mean(values):.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("pruning", "workers", "startup"), default="pruning")
    p.add_argument("--rounds", type=int, default=2, help="--part startup: measurements of each")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--eval-problems", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--problems", type=int, default=4, help="problems per iteration (x 4 rollouts)")
    p.add_argument("--passes", type=int, default=1, help="model.num_iterations: passes over each batch")
    p.add_argument("--steps", type=int, default=2, help="model.steps_per_iteration (and the lr warm-up steps)")
    p.add_argument("--baseline", action="store_true", help="keep the baseline eval in every trial")
    p.add_argument("--root", default=None, help="keep the sweeps here (default: a temporary dir)")
    p.add_argument("--ways", default=None, help="--part pruning: which searches, comma-separated "
                   f"(default: {','.join(PRUNING)})")
    p.add_argument("--one-by-one", action="store_true", help="--part pruning: run the searches in turn")
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_sweep_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{args.part}: " + (f"{args.rounds} rounds" if args.part == "startup" else
          f"{args.trials} trials of {args.iterations} iterations, eval of {args.eval_problems} problems x 2 every "
          f"{args.interval}") + f"; {len(os.sched_getaffinity(0))} cores; sweeps in {root}", flush=True)
    t0 = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if args.part == "startup":
        startup(root, args.rounds)
        return
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
