"""Hyperparameter sweeps: every combination of a grid and/or random samples as its own fit run.

    python -m grpo_lightning sweep --config configs/sat_tiny.yaml \\
        --grid model.lr=5e-6,1e-5,2e-5 --grid model.kl_coef=0.02,0.05,0.1 --parallel 3 \\
        -- --trainer.max_epochs 20

Each combination runs as a separate process (``python -m grpo_lightning fit --config ...
--model.lr 5e-6 ...``), so a crash or an OOM in one run cannot take the others down. Layout:

    lightning_logs/sweeps/<name>/
        sweep.json             manifest: the command, every combination, its run dir and status
        summary.csv            one row per run, sorted by --metric; rewritten as runs finish
        summary.md             the same as a table, plus the error tail of failed runs
        tensorboard/version_K  one HPARAMS session per finished run (swept values + eval metrics)
        runs/version_K/        a normal Lightning run dir (config.yaml, metrics/, checkpoints/,
                               events, server.log) plus output.log (the run's stdout + stderr)

Resources: with ``--parallel N`` on a machine with GPUs, the visible GPUs (CUDA_VISIBLE_DEVICES,
else all) are cut into N disjoint sets of ``--devices-per-run K`` (default: GPUs // N) and each
run gets one set as its CUDA_VISIBLE_DEVICES, so ``trainer.devices`` and ``data.server.gpu``
count within the run's own K GPUs (e.g. K=2, ``trainer.devices: 1``, ``data.server.gpu: 1``:
trainer on the set's first GPU, managed server on its second). ``--devices-per-run 0`` lets runs
share every GPU. With N > 1, each run also gets OMP_NUM_THREADS = MKL_NUM_THREADS = cores // N
(unless set already), so CPU runs do not oversubscribe the cores.

The default name is the config's stem plus a hash of the sweep (config, grid, samples, trials,
seed, fit arguments), so running the same command again resumes the same sweep: combinations
that finished OK are skipped, failed ones start again in a fresh version dir, and runs that were
interrupted continue from their ``checkpoints/last.ckpt`` in their own dir (from scratch in a
fresh dir when they had none). Every combination is checked with the real CLI parser and the
model / data module ``__init__`` validation before any run starts; nothing is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .inference.launch import signal_group
from .runfiles import read_evals, write_text_atomic

STATUS_ORDER = {"ok": 0, "running": 1, "interrupted": 2, "pending": 3, "failed": 4}
METRICS = ("final_success_rate", "best_success_rate", "final_reward_mean", "best_reward_mean",
           "baseline_success_rate", "final_iteration", "wall_s")
TAIL_LINES = 20
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


# ---------------------------------------------------------------------------- the plan


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets: ``1e-5,[0.9,0.95]`` -> ``["1e-5", "[0.9,0.95]"]``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{(") - (ch in "]})")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """``model.lr=5e-6,1e-5`` -> ``("model.lr", ["5e-6", "1e-5"])``."""
    key, sep, values = spec.partition("=")
    key = key.strip().lstrip("-")
    vals = split_values(values) if sep else []
    if not key or not vals or any(v == "" for v in vals):
        raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. model.lr=1e-5,2e-5)")
    return key, vals


@dataclass(frozen=True)
class Distribution:
    """``uniform:a:b``, ``loguniform:a:b`` (uniform in log space), ``intuniform:a:b`` (both
    ends included) or ``choice:x,y,z``. Floats are rounded to 4 significant digits (and kept
    inside the bounds), so the value a run gets is exactly the one the summary shows."""

    kind: str
    args: tuple[str, ...]

    @classmethod
    def parse(cls, key: str, text: str) -> Distribution:
        kind, _, rest = text.partition(":")
        if kind == "choice":
            args = tuple(split_values(rest))
            if not rest or any(a == "" for a in args):
                raise ValueError(f"--sample {key}: choice needs values, e.g. choice:a,b,c")
            return cls(kind, args)
        if kind not in ("uniform", "loguniform", "intuniform"):
            raise ValueError(f"--sample {key}: unknown distribution {kind!r} "
                             "(uniform, loguniform, intuniform or choice)")
        parts = rest.split(":")
        try:
            lo, hi = (int(p) for p in parts) if kind == "intuniform" else (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"--sample {key}: expected {kind}:LOW:HIGH, got {text!r}") from None
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            raise ValueError(f"--sample {key}: {text!r} needs LOW < HIGH" + (" and LOW > 0" if kind == "loguniform" else ""))
        return cls(kind, (str(lo), str(hi)))

    def sample(self, rng: Any) -> str:
        if self.kind == "choice":
            return rng.choice(self.args)
        if self.kind == "intuniform":
            return str(rng.randint(int(self.args[0]), int(self.args[1])))
        lo, hi = float(self.args[0]), float(self.args[1])
        x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if self.kind == "loguniform" else rng.uniform(lo, hi)
        return f"{min(max(float(f'{x:.4g}'), lo), hi):.4g}"


def parse_sample(spec: str) -> tuple[str, Distribution]:
    key, sep, dist = spec.partition("=")
    key = key.strip().lstrip("-")
    if not key or not sep:
        raise ValueError(f"--sample {spec!r}: expected KEY=DIST:ARGS (e.g. model.lr=loguniform:1e-6:1e-4)")
    return key, Distribution.parse(key, dist.strip())


def plan(grid: list[tuple[str, list[str]]], samples: list[tuple[str, Distribution]],
         trials: int, seed: int) -> list[dict[str, str]]:
    """The combinations, in order: the grid's product (first ``--grid`` slowest) crossed with
    ``trials`` random points drawn once from ``random.Random(seed)`` (every grid point gets the
    same sampled values, so grid points compare like for like). Duplicates are dropped."""
    rng = random.Random(seed)
    points = [{k: d.sample(rng) for k, d in samples} for _ in range(trials if samples else 1)]
    combos, seen = [], set()
    for values in itertools.product(*(vals for _, vals in grid)):
        for point in points:
            combo = {**dict(zip([k for k, _ in grid], values, strict=True)), **point}
            if combo_id(combo) not in seen:
                seen.add(combo_id(combo))
                combos.append(combo)
    return combos


def combo_id(overrides: dict[str, str]) -> str:
    """A combination's identity: its overrides as text, in key order (``--grid`` order is free)."""
    return json.dumps(sorted(overrides.items()))


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


def validate(base_args: list[str], run: Run, sweep_dir: Path, devices_per_run: int) -> str | None:
    """The error of one combination (naming the key), or None when the fit CLI accepts it.

    With GPU sets, ``data.server.gpu`` counts among the run's own GPUs: the run's trainer sees
    only them (``child_env``) and ``launch.server_env`` maps the index through its
    ``CUDA_VISIBLE_DEVICES``."""
    try:
        cli = build_cli(base_args + override_args(run.overrides) + logger_args(sweep_dir, run.version))
    except Exception as exc:  # jsonargparse.ArgumentError, ValueError from the __init__ checks, ...
        return str(exc).strip()
    log_dir = Path(cli.trainer.log_dir or "").resolve()
    if log_dir != (sweep_dir / run.run_dir).resolve():
        return (f"trainer.logger must be a TensorBoardLogger (or another logger with save_dir/name/version) "
                f"so that runs land in {sweep_dir / run.run_dir}; it resolves to {log_dir}")
    if devices_per_run:
        devices, gpu = cli.config.trainer.devices, cli.config.data.server.gpu
        if isinstance(devices, int) and devices > devices_per_run:
            return f"trainer.devices={devices} but each run gets --devices-per-run {devices_per_run} GPUs"
        if isinstance(gpu, int) and gpu >= devices_per_run:
            return (f"data.server.gpu={gpu} but each run sees GPUs 0..{devices_per_run - 1} "
                    f"(--devices-per-run {devices_per_run})")
    return None


# ---------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One combination's entry in ``sweep.json``."""

    overrides: dict[str, str]
    version: int
    status: str = "pending"
    returncode: int | None = None
    wall_s: float = 0.0
    started_at: str | None = None
    finished_at: str | None = None
    devices: str | None = None
    pid: int | None = None
    resume_from: str | None = None
    error_tail: str | None = None
    previous_run_dirs: list[str] | None = None

    @property
    def name(self) -> str:
        return f"version_{self.version}"

    @property
    def run_dir(self) -> str:
        """Relative to the sweep dir."""
        return f"runs/{self.name}"


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


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last non-empty lines of a run's output (progress-bar redraws and colours removed)."""
    try:
        text = path.read_bytes()[-32768:].decode(errors="replace")
    except OSError:
        return f"(no output at {path})"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    kept = [ln.split("\r")[-1].rstrip() for ln in text.split("\n")]
    return "\n".join([ln for ln in kept if ln.strip()][-lines:])


@dataclass
class Child:
    run: Run
    proc: subprocess.Popen
    log: Any
    gpus: list[str] | None
    t0: float


# ---------------------------------------------------------------------------- results


def read_results(run_dir: Path) -> dict[str, Any]:
    """Final / best / baseline eval numbers from ``metrics/eval_*.json``.

    final: the eval of the highest iteration; best: the maximum over ``eval_iter_*`` (the
    baseline is its own column, never "best"); final_iteration: that highest iteration."""
    curve = read_evals(run_dir)
    baseline = curve.get(0, {})
    evals = {step - 1: e for step, e in curve.items() if step > 0}  # by iteration
    final = evals[max(evals)] if evals else {}

    def best(key: str) -> float | None:
        values = [e[key] for e in evals.values() if e.get(key) is not None]
        return max(values) if values else None

    return {
        "final_success_rate": final.get("success_rate"),
        "best_success_rate": best("success_rate"),
        "final_reward_mean": final.get("reward_mean"),
        "best_reward_mean": best("reward_mean"),
        "baseline_success_rate": baseline.get("success_rate"),
        "final_iteration": max(evals) if evals else None,
        "_curve": list(curve.items()),
    }


def typed(value: str) -> float | int | bool | str:
    """A CLI value as TensorBoard should see it (numbers get sliders and parallel coordinates)."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(value)
    return value


def write_hparams(sweep_dir: Path, run: Run, results: dict[str, Any]) -> None:
    """One TensorBoard HPARAMS session per finished run in ``tensorboard/version_K``: the swept
    values, the eval curves (``eval/success_rate``, ``eval/reward_mean`` by step, the last being
    the final value the table shows), ``best/*``, and the session status (ok / failed).

    No experiment summary is written: TensorBoard derives the columns from all sessions, so
    runs added later (a grown grid) still fit in."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    def hparams_summary(tag: str, **data: Any) -> Summary:
        meta = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=metadata.NULL_TENSOR)])

    folder = sweep_dir / "tensorboard" / run.name
    if folder.exists():
        return
    start = plugin_data_pb2.SessionStartInfo(group_name=run.name, start_time_secs=time.time() - run.wall_s)
    for k, v in run.overrides.items():
        value = typed(v)
        if isinstance(value, bool):
            start.hparams[k].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[k].number_value = value
        else:
            start.hparams[k].string_value = value
    status = api_pb2.STATUS_SUCCESS if run.status == "ok" else api_pb2.STATUS_FAILURE
    writer = SummaryWriter(log_dir=str(folder))
    try:
        writer.file_writer.add_summary(hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start))
        for step, e in results["_curve"]:
            for key in ("success_rate", "reward_mean"):
                if e.get(key) is not None:
                    writer.add_scalar(f"eval/{key}", e[key], step)
        last = results["_curve"][-1][0] if results["_curve"] else 0
        for key in ("success_rate", "reward_mean"):
            if results[f"best_{key}"] is not None:
                writer.add_scalar(f"best/{key}", results[f"best_{key}"], last)
        writer.add_scalar("wall_s", run.wall_s, last)
        end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
        writer.file_writer.add_summary(hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end))
    finally:
        writer.close()


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


# ---------------------------------------------------------------------------- the sweep


class Sweep:
    """The manifest, the summary and the scheduler of one sweep directory."""

    def __init__(self, args: argparse.Namespace, fit_args: list[str], argv: list[str]) -> None:
        self.args = args
        self.fit_args = fit_args
        grid = [parse_grid(s) for s in args.grid]
        samples = [parse_sample(s) for s in args.sample]
        keys = [k for k, _ in grid] + [k for k, _ in samples]
        if not keys:
            raise ValueError("nothing to sweep: give at least one --grid KEY=V1,V2 or --sample KEY=DIST")
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"swept more than once: {', '.join(dup)}")
        fixed = [k for k in keys if any(a == f"--{k}" or a.startswith(f"--{k}=") for a in fit_args)]
        if fixed:
            raise ValueError(f"swept and also fixed after '--': {', '.join(fixed)}")
        if any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in fit_args):
            raise ValueError("--ckpt_path is managed by the sweep (resume); start runs from a checkpoint with "
                             "--model.model_name_or_path instead")
        if args.trials < 1 or args.parallel < 1:
            raise ValueError("--trials and --parallel must be at least 1")
        if args.trials > 1 and not samples:
            raise ValueError("--trials draws --sample points; to repeat a run, sweep seed_everything instead")
        self.base = {"config": args.config, "fit_args": fit_args}
        spec = {**self.base, "grid": grid, "sample": [(k, d.kind, d.args) for k, d in samples],
                "trials": args.trials, "seed": args.seed}
        digest = hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:6]
        self.name = args.name or f"{Path(args.config).stem}-{digest}"
        self.dir = Path(args.root) / self.name
        self.combos = plan(grid, samples, args.trials, args.seed)
        self.command = [sys.executable, "-m", "grpo_lightning", "sweep", *argv]
        self.runs: list[Run] = []
        self.spec = {"grid": dict(grid), "sample": {k: f"{d.kind}:{':'.join(d.args)}" for k, d in samples},
                     "trials": args.trials, "seed": args.seed}
        self.skipped: list[Run] = []
        self.stop_signals: list[int] = []

    # ------------------------------------------------------------------ manifest

    def load(self) -> None:
        path = self.dir / "sweep.json"
        if not path.exists():
            return
        data = json.loads(path.read_text())
        if data["base"] != self.base:
            raise ValueError(f"{self.dir} holds a sweep of {data['base']}, not of {self.base}; use another --name")
        self.runs = [Run(**r) for r in data["runs"]]

    def save(self) -> None:
        runs = [asdict(r) for r in self.runs]
        payload = {"name": self.name, "command": shlex.join(self.command), "base": self.base, **self.spec, "runs": runs}
        write_text_atomic(self.dir / "sweep.json", json.dumps(payload, indent=2) + "\n")

    def prepare(self) -> list[Run]:
        """Match the plan against the manifest; return the runs to start, in plan order.

        ok: skipped. interrupted (or "running" left by a sweep that died) with a
        ``checkpoints/last.ckpt``: resumed in its own dir. Failed, or interrupted without a
        checkpoint: a fresh version dir (the old one stays, listed in previous_run_dirs)."""
        by_id = {combo_id(r.overrides): r for r in self.runs}
        used = {r.version for r in self.runs} | {
            int(p.name[8:]) for p in (self.dir / "runs").glob("version_*") if p.name[8:].isdigit()}
        used |= {int(d.rsplit("_", 1)[1]) for r in self.runs for d in r.previous_run_dirs or []}
        fresh = itertools.count(max(used, default=-1) + 1)
        todo = []
        for combo in self.combos:
            run = by_id.get(combo_id(combo))
            if run is None:
                run = Run(overrides=combo, version=next(fresh))
                self.runs.append(run)
            elif run.status == "ok":
                self.skipped.append(run)
                continue
            elif run.status in ("interrupted", "running") and (self.dir / run.run_dir / "checkpoints" / "last.ckpt").is_file():
                run.resume_from = f"{run.run_dir}/checkpoints/last.ckpt"
            elif (self.dir / run.run_dir).exists():
                run.previous_run_dirs = [*(run.previous_run_dirs or []), run.run_dir]
                run.version, run.wall_s, run.resume_from = next(fresh), 0.0, None
            run.status, run.returncode, run.error_tail = "pending", None, None
            todo.append(run)
        return todo

    def describe(self, run: Run) -> str:
        return " ".join(f"{k}={v}" for k, v in run.overrides.items())

    # ------------------------------------------------------------------ summary

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for run in self.runs:
            results = read_results(self.dir / run.run_dir)
            error = (run.error_tail or "").splitlines()
            rows.append({"run": run.name, "status": run.status, **run.overrides,
                         **{m: results[m] for m in METRICS if m != "wall_s"}, "wall_s": round(run.wall_s, 1),
                         "run_dir": run.run_dir, "error": error[-1] if error else ""})
        sign = -1 if self.args.mode == "max" else 1

        def order(row: dict[str, Any]) -> tuple:
            value = row[self.args.metric]
            tie = row["final_reward_mean"]
            return (STATUS_ORDER.get(row["status"], 9), value is None, sign * (value or 0), -(tie or 0), int(row["run"][8:]))

        return sorted(rows, key=order)

    def write_summary(self) -> str:
        """Rewrite summary.csv and summary.md (and the manifest); returns the markdown."""
        for run in self.runs:
            if run.status in ("ok", "failed"):
                write_hparams(self.dir, run, read_results(self.dir / run.run_dir))  # once per run dir
        rows = self.rows()
        keys = list(dict.fromkeys(k for r in self.runs for k in r.overrides))
        columns = ["run", "status", *keys, *METRICS, "run_dir", "error"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        write_text_atomic(self.dir / "summary.csv", buf.getvalue())

        counts = {s: sum(r.status == s for r in self.runs) for s in STATUS_ORDER}
        lines = [f"# Sweep `{self.name}`", "", f"`{shlex.join(['python', *self.command[1:]])}`", "",
                 f"{len(self.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                 + f". Sorted by `{self.args.metric}` ({self.args.mode}); eval success rate and mean reward: "
                 "final = last iteration's eval, best = best iteration eval (baseline excluded).", ""]
        md_cols = ["#", "run", "status", *keys, "final success", "best success", "final reward", "best reward",
                   "baseline success", "final iter", "wall (s)"]
        lines += ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
        for i, row in enumerate(rows, 1):
            cells = [str(i), f"[{row['run']}]({row['run_dir']})", row["status"], *(f"`{row.get(k, '')}`" for k in keys),
                     *(fmt(row[m]) for m in METRICS[:-1]), f"{row['wall_s']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        failed = [r for r in self.runs if r.status == "failed"]
        for run in failed:
            lines += ["", f"## {run.name} failed (exit code {run.returncode}): {self.describe(run)}", "",
                      "```", run.error_tail or "", "```", f"Full output: `{run.run_dir}/output.log`"]
        md = "\n".join(lines) + "\n"
        write_text_atomic(self.dir / "summary.md", md)
        self.save()
        return md

    # ------------------------------------------------------------------ running

    def start(self, run: Run, gpus: list[str] | None, threads: int | None) -> Child:
        run_dir = self.dir / run.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "grpo_lightning", "fit", "--config", self.args.config, *self.fit_args,
                *override_args(run.overrides), *logger_args(self.dir, run.version)]
        if run.resume_from:
            argv += ["--ckpt_path", str(self.dir / run.resume_from)]
        log = open(run_dir / "output.log", "ab")  # noqa: SIM115 - closed in finish()
        log.write(f"=== {now()} sweep {self.name} starts: {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(gpus, threads), start_new_session=True)
        run.status, run.started_at, run.pid = "running", now(), proc.pid
        run.devices = ",".join(gpus) if gpus is not None else None
        print(f"start {run.name} ({self.describe(run)})" + (f" resuming {run.resume_from}" if run.resume_from else "")
              + (f" on GPUs {run.devices}" if gpus else ""), flush=True)
        return Child(run, proc, log, gpus, time.monotonic())

    def finish(self, child: Child, status: str | None = None) -> None:
        run = child.run
        run.returncode = child.proc.returncode
        run.status = status or ("ok" if run.returncode == 0 else "failed")
        run.wall_s += time.monotonic() - child.t0
        run.finished_at = now()
        child.log.close()
        if run.status != "ok":
            run.error_tail = log_tail(self.dir / run.run_dir / "output.log")
        result = read_results(self.dir / run.run_dir)
        print(f"{run.status} {run.name} ({self.describe(run)}) in {run.wall_s:.0f}s"
              + (f", final success {result['final_success_rate']:.3f}" if result["final_success_rate"] is not None else "")
              + (f", exit code {run.returncode}:\n    " + "\n    ".join((run.error_tail or "").splitlines()[-4:])
                 if run.status == "failed" else ""), flush=True)

    def execute(self, todo: list[Run], gpu_sets: list[list[str]] | None, threads: int | None) -> None:
        """Run ``todo`` with at most ``--parallel`` children; stop them all on a signal."""
        queue, children = list(todo), []
        free = list(gpu_sets) if gpu_sets is not None else None
        try:
            while (queue or children) and not self.stop_signals:
                while queue and len(children) < self.args.parallel:
                    gpus = free.pop(0) if free is not None else None
                    children.append(self.start(queue.pop(0), gpus, threads))
                    self.write_summary()
                for child in [c for c in children if c.proc.poll() is not None]:
                    children.remove(child)
                    if free is not None and child.gpus is not None:
                        free.append(child.gpus)
                    self.finish(child)
                    self.write_summary()
                time.sleep(0.2)
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
        while any(c.proc.poll() is None for c in children) and time.monotonic() < deadline \
                and len(self.stop_signals) == signals:
            time.sleep(0.2)
        for child in children:
            if child.proc.poll() is None:
                signal_group(child.proc.pid, signal.SIGKILL)
            child.proc.wait()
            signal_group(child.proc.pid, signal.SIGKILL)  # anything left in its group
            self.finish(child, status="interrupted")


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
        description="Run every combination of a grid and/or random samples as its own `fit` run.\n"
                    "Arguments after `--` go to every run.",
        epilog="examples:\n"
               "  sweep --config configs/sat_tiny.yaml --grid model.lr=5e-4,1e-3 --grid model.kl_coef=0,0.05 "
               "--parallel 2 -- --trainer.max_epochs 10\n"
               "  sweep --config configs/sat_tiny.yaml --sample model.lr=loguniform:1e-4:3e-3 --trials 8 --seed 0\n"
               "Run the same command again to resume: runs that finished OK are skipped.")
    p.add_argument("--config", required=True, help="the fit config every run starts from")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of one key (commas inside [] stay in a value); repeat for a product")
    p.add_argument("--sample", action="append", default=[], metavar="KEY=DIST",
                   help="uniform:LO:HI, loguniform:LO:HI, intuniform:LO:HI or choice:A,B,C; "
                        "--trials points, crossed with the grid")
    p.add_argument("--trials", type=int, default=1, help="random points drawn from the --sample keys")
    p.add_argument("--seed", type=int, default=0, help="seed of the random points (not of the runs)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--devices-per-run", type=int, default=None, metavar="K",
                   help="GPUs per run (CUDA_VISIBLE_DEVICES split into disjoint sets of K); default: "
                        "visible GPUs // parallel when --parallel > 1, else all GPUs for the one run")
    p.add_argument("--name", help="sweep name (default: the config's stem and a hash of the sweep)")
    p.add_argument("--root", default="lightning_logs/sweeps", help="the sweep dir is ROOT/NAME")
    p.add_argument("--metric", default="final_success_rate", choices=METRICS, metavar="METRIC",
                   help=f"summary sort key, one of {', '.join(METRICS)} (default final_success_rate)")
    p.add_argument("--mode", default="max", choices=("max", "min"), help="best first for max, lowest first for min")
    p.add_argument("--stop-timeout", type=float, default=30.0, metavar="S",
                   help="seconds runs get to exit after SIGTERM (on Ctrl-C) before they are killed")
    p.add_argument("--dry-run", action="store_true", help="list and validate the combinations, run nothing")
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


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 all runs ok, 1 some run failed, 2 invalid sweep, 128+signal when stopped."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, fit_args = parse_args(argv)
    try:
        sweep = Sweep(args, fit_args, argv)
        gpu_sets, per_run, threads = gpu_plan(args)
        sweep.load()
        todo = sweep.prepare()
    except ValueError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    print(f"sweep {sweep.name}: {len(sweep.combos)} combinations, {len(todo)} to run, in {sweep.dir}", flush=True)
    for run in sweep.skipped:
        print(f"  skip {run.name} ({sweep.describe(run)}): finished OK in {run.run_dir}")
    base_args = ["--config", args.config, *fit_args]
    rejected: dict[str, list[Run]] = {}
    for run in todo:
        error = validate(base_args, run, sweep.dir, per_run)
        if error:
            rejected.setdefault(error, []).append(run)
    if rejected:
        for error, runs in rejected.items():
            which = sweep.describe(runs[0]) + (f" and {len(runs) - 1} more" if len(runs) > 1 else "")
            print(f"sweep: invalid combination ({which}):\n    " + error.replace("\n", "\n    "), file=sys.stderr)
        bad = sum(map(len, rejected.values()))
        print(f"sweep: {bad} of {len(todo)} combinations rejected; no run started", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in todo:
            print(f"  {run.name}: {sweep.describe(run)}" + (f" (resume {run.resume_from})" if run.resume_from else ""))
        return 0

    from filelock import FileLock, Timeout

    sweep.dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(sweep.dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"sweep: another sweep is running in {sweep.dir}", file=sys.stderr)
        return 2
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, _frame: sweep.stop_signals.append(signum)) for s in handled}
    try:
        sweep.execute(todo, gpu_sets, threads)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        lock.release()
    print(sweep.write_summary().split("\n## ")[0])
    print(f"summary: {sweep.dir / 'summary.md'}")
    if sweep.stop_signals:
        return SIGNAL_EXIT.get(sweep.stop_signals[0], 130)
    mine = {combo_id(c) for c in sweep.combos}
    return 1 if any(r.status != "ok" for r in sweep.runs if combo_id(r.overrides) in mine) else 0
