"""Hyperparameter sweeps on an Optuna study: each trial is its own ``fit`` run.

    python -m grpo_lightning sweep --config configs/sat_tiny.yaml \\
        --grid model.lr=5e-6,1e-5,2e-5 --grid model.kl_coef=0.02,0.05,0.1 --parallel 3 \\
        -- --trainer.max_epochs 20
    python -m grpo_lightning sweep --config configs/sat_tiny.yaml --sampler tpe --pruner asha \\
        --sample model.lr=loguniform:1e-4:3e-3 --trials 12 -- --data.eval.interval 5

The search (``--grid`` points, ``--sample`` distributions, the grid / random / TPE sampler) is
an Optuna study; its trials are ``fit`` processes (``python -m grpo_lightning fit --config ...
--model.lr 5e-6 ...``), so a crash or an OOM in one cannot take the others down. Each is forked
from the worker's fork server, which has imported torch and Lightning once, so a trial does not
pay for that import again (see ``FitProcess``). Layout:

    lightning_logs/sweeps/<name>/
        study.journal          the Optuna study (unless --storage names another storage)
        summary.csv            one row per trial, sorted by --metric; rewritten as trials start and end
        summary.md             the same as a table, plus the error tail of failed runs
        tensorboard/version_K  one HPARAMS session per finished trial (swept values + eval metrics)
        runs/version_K/        trial K's normal Lightning run dir (config.yaml, metrics/, checkpoints/,
                               events, server.log) plus output.log (the run's stdout + stderr)

Workers: every sweep process is a worker of its study. Start the same command again (on this
machine, or on another one that sees the sweep dir on a shared filesystem) and it joins: it
takes the trials nobody runs yet. Workers take turns through ``<sweep dir>/.lock`` when they
ask for a trial, so two never get the same grid point, and when they write the summary.

Pruning (``--pruner median|asha``): while a trial runs, its ``metrics/eval_iter_*.json`` are
reported to the study as they appear (never the baseline eval); a trial the pruner stops is
sent SIGTERM like Ctrl-C (its ``fit`` stops its inference server) and ends ``pruned``.

Resources: with ``--parallel N`` on a machine with GPUs, the visible GPUs (CUDA_VISIBLE_DEVICES,
else all) are cut into N disjoint sets of ``--devices-per-run K`` (default: GPUs // N) and each
run gets one set as its CUDA_VISIBLE_DEVICES, so ``trainer.devices`` and ``data.server.gpu``
count within the run's own K GPUs. ``--devices-per-run 0`` lets runs share every GPU. With
N > 1, each run also gets OMP_NUM_THREADS = MKL_NUM_THREADS = cores // N (unless set already).

The default name is the config's stem plus a hash of the search (config, fit arguments, grid,
samples, sampler, seed, metric), so the same command joins the same study. Running it again
runs what is left: failed trials once more in a fresh dir, interrupted ones from their
``checkpoints/last.ckpt`` in their own dir. The values are checked with the real CLI parser and
the model / data module ``__init__`` validation before any trial starts; nothing is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .inference.launch import signal_group
from .sweep_report import METRICS, log_tail, read_results, write_summary
from .sweep_study import (
    PRUNERS,
    SAMPLERS,
    Search,
    check_pruner,
    cli_value,
    eval_key,
    next_trial,
    recover,
)

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
POLL_S = 0.5


def override_args(overrides: dict[str, str]) -> list[str]:
    return [tok for k, v in overrides.items() for tok in (f"--{k}", v)]


# ---------------------------------------------------------------------------- validation


def build_cli(args: list[str]) -> Any:
    """The fit command's LightningCLI, parsed and instantiated but not run.

    Mirrors ``cli.main``: unknown keys and wrong types fail in the parser, out-of-range values
    in ``GRPOModule`` / ``RolloutDataModule.__init__``; no model is loaded (that happens in
    ``configure_model``) and no server starts (``setup``)."""
    from .cli import build_cli as cli

    with quiet():  # after the import: Lightning sets its loggers' levels when first imported
        return cli(args, run=False, exit_on_error=False)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's info lines (seed, accelerator, tips) while validating."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "args and sys.argv both given"
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def validate(base_args: list[str], overrides: dict[str, str], sweep_dir: Path, devices_per_run: int) -> tuple[str | None, Any]:
    """(the error of one point naming the key, or None; the parsed fit config).

    With GPU sets, ``data.server.gpu`` counts among the run's own GPUs: the run's trainer sees
    only them (``child_env``) and ``launch.server_env`` maps the index through its
    ``CUDA_VISIBLE_DEVICES``."""
    try:
        cli = build_cli(base_args + override_args(overrides) + logger_args(sweep_dir, 0))
    except Exception as exc:  # jsonargparse.ArgumentError, ValueError from the __init__ checks, ...
        return str(exc).strip(), None
    log_dir = Path(cli.trainer.log_dir or "").resolve()
    if log_dir != (sweep_dir / "runs" / "version_0").resolve():
        return (f"trainer.logger must be a TensorBoardLogger (or another logger with save_dir/name/version) "
                f"so that runs land in {sweep_dir / 'runs'}; it resolves to {log_dir}"), None
    if devices_per_run:
        devices, gpu = cli.config.trainer.devices, cli.config.data.server.gpu
        if isinstance(devices, int) and devices > devices_per_run:
            return f"trainer.devices={devices} but each run gets --devices-per-run {devices_per_run} GPUs", None
        outside = [g for g in (gpu if isinstance(gpu, list) else [gpu]) if isinstance(g, int) and g >= devices_per_run]
        if outside:
            return (f"data.server.gpu={gpu} but each run sees GPUs 0..{devices_per_run - 1} "
                    f"(--devices-per-run {devices_per_run})"), None
    return None, cli.config


# ---------------------------------------------------------------------------- runs


def logger_args(sweep_dir: Path, version: int) -> list[str]:
    """Pin the run's dir: ``<sweep_dir>/runs/version_<version>``."""
    return ["--trainer.logger.init_args.save_dir", str(sweep_dir), "--trainer.logger.init_args.name", "runs",
            "--trainer.logger.init_args.version", str(version)]


def visible_gpus() -> list[str]:
    """GPU ids the sweep may hand out: CUDA_VISIBLE_DEVICES' entries, else every CUDA device."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def child_env(gpus: list[str] | None, threads: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, str(threads))  # a value the user set wins
    return env


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# A trial's ``fit`` imports torch and Lightning before it does anything: about 30 CPU-seconds on
# 2 cores, a third of a short trial. Each worker imports them once, in a fork server, and every
# trial is a fork of it: still its own process (crash isolation, process group, signals, exit
# code), without the import. The fork server never initialises CUDA or a thread pool, so its
# children set up both from their own environment.
# ``sweep`` holds run_fit, each trial's entry point; the server's modules are for the process a
# trial forks to become its built-in server (inference/prefork.py).
PRELOAD = ["grpo_lightning.cli", "grpo_lightning.sweep", "grpo_lightning.inference.server",
           "grpo_lightning.inference.engine", "uvicorn"]


@functools.cache
def fork_context() -> Any:
    """The fork server's context; the server starts with the first process forked from it and
    lives as long as this process (sweeps run in one process, e.g. tests, share it)."""
    import atexit
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    atexit.register(stop_fork_server)
    return ctx


def start_fork_server() -> None:
    """Start the fork server and wait until it has imported the training stack (by forking a
    child that does nothing), before the worker handles signals: a Ctrl-C meanwhile just ends
    the worker, with no trial started."""
    proc = fork_context().Process(target=int)
    proc.start()
    proc.join()


def stop_fork_server() -> None:
    """Stop this process's fork server and reap it, so its CPU time (the one import, and the
    trials it reaped) counts in the worker's. ``_stop`` is private; without it the server still
    exits when the worker does (it watches a pipe from the worker)."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop is not None:
        with contextlib.suppress(OSError, ChildProcessError):
            stop()


def run_fit(argv: list[str], log_path: str, env: dict[str, str], cpu_s: Any) -> None:
    """A trial's process: the fork server's child becomes ``python -m grpo_lightning fit ...``
    run in a new session (the sweep signals the group), with the run's environment and its
    output appended to ``log_path``. Leaves its CPU time (its own plus its inference server's)
    in ``cpu_s`` for the worker, which is not its parent."""
    import atexit
    import resource

    def record() -> None:
        usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpu_s.value = sum(u.ru_utime + u.ru_stime for u in usage)

    def record_and_die(signum: int, _frame: Any) -> None:
        # fit's own handlers stop its inference server first and then call this one, so the
        # server's CPU time is counted; then the run ends by the signal, as a fresh fit would.
        record()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, record_and_die)
    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    from .inference import prefork

    prefork.redirect_output(log_path)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    prefork.start()  # while this process has no other thread (see inference/prefork.py)
    threads = env.get("OMP_NUM_THREADS")
    if threads:  # the OpenMP runtime read the fork server's environment when torch loaded
        import torch

        torch.set_num_threads(int(threads))
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *argv]  # as ``python -m grpo_lightning`` sets it
    code = 1
    try:
        from .cli import main as fit_main

        code = fit_main()
    finally:
        atexit._run_exitfuncs()  # the server clean-up hooks; a forked child skips atexit
        prefork.discard()
        record()
        sys.stdout.flush()
        sys.stderr.flush()
    raise SystemExit(code)


class FitProcess:
    """A trial's ``fit`` run forked from the worker's fork server (``run_fit``)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        ctx = fork_context()
        self._cpu = ctx.Value("d", 0.0, lock=False)
        self._proc = ctx.Process(target=run_fit, args=(argv, str(log_path), env, self._cpu))
        self._proc.start()
        self.pid: int = self._proc.pid  # type: ignore[assignment]
        self.returncode: int | None = None

    @property
    def cpu_s(self) -> float:
        return float(self._cpu.value)

    def poll(self, block: bool = False) -> int | None:
        """The exit code (negative: the signal that ended it), or None while it runs."""
        if self.returncode is None:
            self._proc.join(None if block else 0)
            self.returncode = self._proc.exitcode
        return self.returncode


@dataclass
class Child:
    """A running trial: its ``fit`` process and what the worker has reported of it."""

    trial: Any  # optuna.Trial
    run_dir: str
    proc: FitProcess
    gpus: list[str] | None
    t0: float
    reported: set[int] = field(default_factory=set)
    pruned_at: float | None = None
    cpu_s: float = 0.0


def reap(child: Child, block: bool = False) -> bool:
    """Collect an exited child with its CPU time (its own plus that of the processes it waited
    for, e.g. its inference server); False while it runs."""
    if child.proc.poll(block) is None:
        return False
    child.cpu_s = child.proc.cpu_s
    return True


# ---------------------------------------------------------------------------- the worker


class Worker:
    """One sweep process: asks the study for trials, runs them, reports their evals, prunes."""

    def __init__(self, args: argparse.Namespace, fit_args: list[str], argv: list[str], search: Search) -> None:
        self.args, self.fit_args, self.search = args, fit_args, search
        fixed = [k for k in search.keys if any(a == f"--{k}" or a.startswith(f"--{k}=") for a in fit_args)]
        if fixed:
            raise ValueError(f"swept and also fixed after '--': {', '.join(fixed)}")
        if any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in fit_args):
            raise ValueError("--ckpt_path is managed by the sweep (resume); start runs from a checkpoint with "
                             "--model.model_name_or_path instead")
        if args.parallel < 1:
            raise ValueError("--parallel must be at least 1")
        if args.pruner not in PRUNERS:
            raise ValueError(f"--pruner {args.pruner!r}: unknown pruner (one of {', '.join(PRUNERS)})")
        self.spec = {"config": args.config, "fit_args": fit_args, **search.spec(), "metric": args.metric,
                     "mode": args.mode}
        digest = hashlib.sha1(json.dumps(self.spec).encode()).hexdigest()[:6]
        self.name = args.name or f"{Path(args.config).stem}-{digest}"
        self.dir = Path(args.root) / self.name
        self.command = [sys.executable, "-m", "grpo_lightning", "sweep", *argv]
        self.study: Any = None
        self.lock: Any = None
        self.max_epochs = 0
        self.key = eval_key(args.metric)
        self.stop_signals: list[int] = []
        self.finished: list[str] = []  # statuses of this worker's trials

    def describe(self, params: dict[str, Any]) -> str:
        return " ".join(f"{k}={cli_value(params[k])}" for k in self.search.keys if k in params)

    def write_summary(self) -> str:
        with self.lock:
            return write_summary(self.study, self.dir, self.search.keys, self.args.metric, self.args.mode, self.command)

    # ------------------------------------------------------------------ running

    def start(self, trial: Any, gpus: list[str] | None, threads: int | None) -> Child:
        params = {k: cli_value(trial.params[k]) for k in self.search.keys}
        run_dir = trial.user_attrs.get("run_dir") or f"runs/version_{trial.number}"
        resume = trial.user_attrs.get("resume_from")
        (self.dir / run_dir).mkdir(parents=True, exist_ok=True)
        argv = ["fit", "--config", self.args.config, *self.fit_args, *override_args(params),
                *logger_args(self.dir, int(run_dir.rsplit("_", 1)[1]))]
        if resume:
            argv += ["--ckpt_path", str(self.dir / resume)]
        log = self.dir / run_dir / "output.log"
        with log.open("ab") as f:
            f.write(f"=== {now()} sweep {self.name} trial {trial.number} starts: "
                    f"{shlex.join([sys.executable, '-m', 'grpo_lightning', *argv])}\n".encode())
        proc = FitProcess(argv, log, child_env(gpus, threads))
        from .sweep_study import worker_id

        for key, value in {"run_dir": run_dir, "pid": proc.pid, "worker": worker_id(), "started_at": now(),
                           "devices": ",".join(gpus) if gpus is not None else None}.items():
            trial.set_user_attr(key, value)
        print(f"start trial {trial.number} in {run_dir} ({self.describe(params)})"
              + (f" resuming {resume}" if resume else "") + (f" on GPUs {','.join(gpus)}" if gpus else ""), flush=True)
        return Child(trial, run_dir, proc, gpus, time.monotonic())

    def report(self, child: Child, prune: bool = True) -> None:
        """Report the trial's new iteration evals (never the baseline, step 0) and stop it the way
        Ctrl-C does when the pruner says so. The last iteration's eval is the trial's result,
        not a reason to stop it."""
        if self.key is None or child.pruned_at is not None:
            return
        new = False
        for step, e in read_results(self.dir / child.run_dir)["_curve"]:
            if step > 0 and step not in child.reported and e.get(self.key) is not None:
                child.trial.report(e[self.key], step)
                child.reported.add(step)
                new = step < self.max_epochs
        if prune and new and self.args.pruner != "none" and child.trial.should_prune():
            print(f"prune trial {child.trial.number} at iteration {max(child.reported)}", flush=True)
            signal_group(child.proc.pid, signal.SIGTERM)
            child.pruned_at = time.monotonic()

    def finish(self, child: Child, interrupted: bool = False) -> None:
        import optuna

        trial, rc = child.trial, child.proc.returncode
        wall = time.monotonic() - child.t0
        result = read_results(self.dir / child.run_dir)
        self.report(child, prune=False)  # the evals written since the last poll
        value = result[self.args.metric] if self.args.metric != "wall_s" else wall
        if child.pruned_at is not None:
            status, state = "pruned", optuna.trial.TrialState.PRUNED
        elif interrupted:
            status, state = "interrupted", optuna.trial.TrialState.FAIL
        elif rc == 0 and value is not None:
            status, state = "ok", optuna.trial.TrialState.COMPLETE
        else:
            status, state = "failed", optuna.trial.TrialState.FAIL
        attrs = {"status": status, "returncode": rc, "wall_s": wall, "cpu_s": child.cpu_s, "finished_at": now()}
        if status in ("failed", "interrupted"):
            attrs["error_tail"] = log_tail(self.dir / child.run_dir / "output.log") if rc != 0 else \
                f"exited 0 without {self.args.metric} (no eval in {child.run_dir}/metrics)"
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        self.study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
        self.finished.append(status)
        print(f"{status} trial {trial.number} ({self.describe(trial.params)}) in {wall:.0f}s, {child.cpu_s:.0f} CPU-s"
              + (f", final success {result['final_success_rate']:.3f}" if result["final_success_rate"] is not None else "")
              + (f", exit code {rc}:\n    " + "\n    ".join(attrs["error_tail"].splitlines()[-4:])
                 if status == "failed" else ""), flush=True)

    def execute(self, gpu_sets: list[list[str]] | None, threads: int | None) -> None:
        """Ask for trials while fewer than ``--parallel`` run and the search has more; stop them
        all on a signal."""
        children: list[Child] = []
        free = list(gpu_sets) if gpu_sets is not None else None
        done = False
        try:
            while not self.stop_signals and (children or not done):
                while not done and len(children) < self.args.parallel and not self.stop_signals:
                    with self.lock:
                        trial = next_trial(self.study, self.search, self.finished.count("failed"))
                    if trial is None:
                        done = True
                        break
                    gpus = free.pop(0) if free is not None else None
                    children.append(self.start(trial, gpus, threads))
                    self.write_summary()
                for child in list(children):
                    if reap(child):
                        children.remove(child)
                        if free is not None and child.gpus is not None:
                            free.append(child.gpus)
                        self.finish(child)
                        self.write_summary()
                        continue
                    self.report(child)
                    if child.pruned_at is not None and time.monotonic() - child.pruned_at > self.args.stop_timeout:
                        signal_group(child.proc.pid, signal.SIGKILL)
                time.sleep(POLL_S)
        finally:
            self.stop(children)
            self.write_summary()

    def stop(self, children: list[Child]) -> None:
        """SIGTERM each run's process group (the fit process stops its inference server), then
        SIGKILL after ``--stop-timeout`` seconds or a second signal."""
        if not children:
            return
        print(f"stopping {len(children)} run(s)...", flush=True)
        for child in children:
            signal_group(child.proc.pid, signal.SIGTERM)
        deadline, signals = time.monotonic() + self.args.stop_timeout, len(self.stop_signals)
        while not all(reap(c) for c in children) and time.monotonic() < deadline \
                and len(self.stop_signals) == signals:
            time.sleep(0.2)
        for child in children:
            if not reap(child):
                signal_group(child.proc.pid, signal.SIGKILL)
                reap(child, block=True)
            signal_group(child.proc.pid, signal.SIGKILL)  # anything left in its group
            self.finish(child, interrupted=child.pruned_at is None)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's own options, and the fit arguments after ``--``."""
    fit_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, fit_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(
        prog="python -m grpo_lightning sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search hyperparameters with an Optuna study; each trial is its own `fit` run.\n"
                    "Arguments after `--` go to every run.",
        epilog="examples:\n"
               "  sweep --config configs/sat_tiny.yaml --grid model.lr=5e-4,1e-3 --grid model.kl_coef=0,0.05 "
               "--parallel 2 -- --trainer.max_epochs 10\n"
               "  sweep --config configs/sat_tiny.yaml --sample model.lr=loguniform:1e-4:3e-3 --trials 8 --seed 0\n"
               "  sweep --config configs/sat_tiny.yaml --sampler tpe --pruner asha --sample model.lr=loguniform:1e-4:3e-3 "
               "--trials 12 -- --data.eval.interval 5\n"
               "Run the same command again to resume, or elsewhere (same sweep dir or --storage) to add a worker.")
    p.add_argument("--config", required=True, help="the fit config every run starts from")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of one key (commas inside [] stay in a value); repeat for a product; "
                        "with --sampler random / tpe the values are choices")
    p.add_argument("--sample", action="append", default=[], metavar="KEY=DIST",
                   help="uniform:LO:HI, loguniform:LO:HI, intuniform:LO:HI or choice:A,B,C")
    p.add_argument("--sampler", default=None, metavar="NAME",
                   help=f"one of {', '.join(SAMPLERS)} (default: grid with only --grid, else random)")
    p.add_argument("--trials", type=int, default=None,
                   help="trials of a random / TPE search (default 1); the grid sampler runs every grid point")
    p.add_argument("--pruner", default="none", metavar="NAME",
                   help=f"one of {', '.join(PRUNERS)}: stop trials whose evals lag (default none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (not of the runs)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="the study's storage: an RDB URL (sqlite:///sweep.db, postgresql://...) or a journal "
                        "file path (default: ROOT/NAME/study.journal)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once in this worker")
    p.add_argument("--devices-per-run", type=int, default=None, metavar="K",
                   help="GPUs per run (CUDA_VISIBLE_DEVICES split into disjoint sets of K); default: "
                        "visible GPUs // parallel when --parallel > 1, else all GPUs for the one run")
    p.add_argument("--name", help="sweep (and study) name (default: the config's stem and a hash of the search)")
    p.add_argument("--root", default="lightning_logs/sweeps", help="the sweep dir is ROOT/NAME")
    p.add_argument("--metric", default="final_success_rate", choices=METRICS, metavar="METRIC",
                   help=f"the objective and sort key, one of {', '.join(METRICS)} (default final_success_rate)")
    p.add_argument("--mode", default="max", choices=("max", "min"), help="maximize or minimize --metric")
    p.add_argument("--stop-timeout", type=float, default=30.0, metavar="S",
                   help="seconds runs get to exit after SIGTERM (Ctrl-C, or pruned) before they are killed")
    p.add_argument("--dry-run", action="store_true", help="list and validate the points, run nothing")
    return p.parse_args(argv), fit_args


def gpu_plan(args: argparse.Namespace) -> tuple[list[list[str]] | None, int, int | None]:
    """(GPU sets handed to runs or None, devices per run, CPU threads per run or None)."""
    gpus = visible_gpus()
    k = args.devices_per_run
    if k is None:
        k = len(gpus) // args.parallel if gpus and args.parallel > 1 else 0
        if gpus and args.parallel > len(gpus):
            raise ValueError(f"--parallel {args.parallel} with {len(gpus)} visible GPUs: give --devices-per-run 0 "
                             "to let runs share them, or lower --parallel")
    if k < 0:
        raise ValueError("--devices-per-run must be >= 0")
    threads = max(1, len(os.sched_getaffinity(0)) // args.parallel) if args.parallel > 1 else None
    if k == 0:
        return None, 0, threads
    if len(gpus) < k * args.parallel:
        raise ValueError(f"--parallel {args.parallel} x --devices-per-run {k} needs {k * args.parallel} GPUs; "
                         f"{len(gpus)} visible ({', '.join(gpus) or 'none'})")
    return [gpus[i * k:(i + 1) * k] for i in range(args.parallel)], k, threads




def prepare(args: argparse.Namespace, base_args: list[str], points: list[dict[str, str]], sweep_dir: Path) -> tuple:
    """What a worker needs from torch and the fit CLI before it starts trials: the GPU plan, the
    points the CLI rejects (by error), and the facts of the config the pruner checks."""
    gpu_sets, per_run, threads = gpu_plan(args)
    rejected: dict[str, list[dict[str, str]]] = {}
    config = None
    for point in points:
        error, parsed = validate(base_args, point, sweep_dir, per_run)
        if error:
            rejected.setdefault(error, []).append(point)
        elif config is None:
            config = {"interval": parsed.data.eval.interval, "max_epochs": parsed.trainer.max_epochs,
                      "num_problems": parsed.data.eval.num_problems}
    return gpu_sets, per_run, threads, rejected, config


def _call_and_send(conn: Any, fn: Any, args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except ValueError as exc:
        conn.send(("error", str(exc)))


def in_fork_server(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a child of the fork server, which has imported torch and the fit CLI
    already, so this process never imports them (~30 CPU-seconds per worker on 2 cores). A
    ``ValueError`` in ``fn`` is raised here."""
    ctx = fork_context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call_and_send, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        status, value = recv.recv()
    except EOFError:
        proc.join()
        raise ValueError(f"validating the sweep failed: its process exited with code {proc.exitcode}") from None
    proc.join()
    if status == "error":
        raise ValueError(value)
    return value


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 every trial of this worker ended ok or pruned, 1 some failed, 2 invalid
    sweep (nothing started), 128+signal when stopped."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, fit_args = parse_args(argv)
    try:
        search = Search.from_args(args.grid, args.sample, args.sampler, args.trials, args.seed)
        worker = Worker(args, fit_args, argv, search)
        try:
            start_fork_server()  # it imports torch and Lightning once: validation runs in it too
        except KeyboardInterrupt:
            return SIGNAL_EXIT[signal.SIGINT]
        gpu_sets, per_run, threads, rejected, config = in_fork_server(
            prepare, args, ["--config", args.config, *fit_args], search.validation_points(), worker.dir)
        if rejected:
            for error, points in rejected.items():
                which = worker.describe(points[0]) + (f" and {len(points) - 1} more" if len(points) > 1 else "")
                print(f"sweep: invalid value ({which}):\n    " + error.replace("\n", "\n    "), file=sys.stderr)
            raise ValueError(f"{sum(map(len, rejected.values()))} of {len(search.validation_points())} points "
                             "rejected; no run started")
        check_pruner(args.pruner, args.metric, config["interval"], config["max_epochs"], config["num_problems"])
        worker.max_epochs = config["max_epochs"]
        if args.dry_run:
            print(f"sweep {worker.name}: {search.sampler} sampler, {search.trials} trials; the first points:")
            for i, point in enumerate(search.preview()):
                print(f"  {i}: {worker.describe(point)}")
            return 0
        from filelock import FileLock

        from .sweep_study import make_pruner, open_storage, open_study

        storage = open_storage(args.storage, worker.dir)
        direction = "maximize" if args.mode == "max" else "minimize"
        pruner = make_pruner(args.pruner, config["interval"])
        worker.dir.mkdir(parents=True, exist_ok=True)
        worker.lock = FileLock(str(worker.dir / ".lock"))
        with worker.lock:
            worker.study = open_study(storage, worker.name, direction, worker.spec, pruner)
            retried = recover(worker.study, worker.dir)
    except ValueError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    done = sum(t.state.is_finished() for t in worker.study.get_trials(deepcopy=False))
    print(f"sweep {worker.name}: {search.sampler} sampler, {args.pruner} pruner, {search.trials} trials, "
          f"{done} finished before" + (f", retrying {len(retried)}" if retried else "")
          + f"; study in {args.storage or worker.dir / 'study.journal'}", flush=True)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, _frame: worker.stop_signals.append(signum)) for s in handled}
    try:
        worker.execute(gpu_sets, threads)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(worker.write_summary().split("\n## ")[0])
    print(f"summary: {worker.dir / 'summary.md'}")
    if worker.stop_signals:
        return SIGNAL_EXIT.get(worker.stop_signals[0], 130)
    return 1 if "failed" in worker.finished else 0
