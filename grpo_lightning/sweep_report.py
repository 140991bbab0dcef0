"""A sweep's tables: ``summary.csv`` / ``summary.md`` from the study's ``trials_dataframe()``
and each run's ``metrics/eval_*.json``, and one TensorBoard HPARAMS session per finished trial.
"""

from __future__ import annotations

import contextlib
import math
import re
import shlex
from pathlib import Path
from typing import Any

import optuna

from .runfiles import read_evals, write_text_atomic
from .sweep_study import cli_value

METRICS = ("final_success_rate", "best_success_rate", "final_reward_mean", "best_reward_mean",
           "baseline_success_rate", "final_iteration", "wall_s")
STATUS_ORDER = {"ok": 0, "pruned": 1, "running": 2, "interrupted": 3, "pending": 4, "failed": 5}
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
TAIL_LINES = 20


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


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last non-empty lines of a run's output (progress-bar redraws and colours removed)."""
    try:
        text = path.read_bytes()[-32768:].decode(errors="replace")
    except OSError:
        return f"(no output at {path})"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    kept = [ln.split("\r")[-1].rstrip() for ln in text.split("\n")]
    return "\n".join([ln for ln in kept if ln.strip()][-lines:])


def typed(value: str) -> float | int | bool | str:
    """A CLI value as TensorBoard should see it (numbers get sliders and parallel coordinates)."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(value)
    return value


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _cell(record: dict[str, Any], column: str) -> Any:
    """A dataframe cell, None where the column is missing or the value is NaN / NaT."""
    value = record.get(column)
    with contextlib.suppress(TypeError, ValueError):
        if value is None or (not isinstance(value, str) and math.isnan(value)):
            return None
    return value


def trial_rows(study: optuna.Study, sweep_dir: Path, keys: list[str], metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial, best first: the swept values, state and status, the eval numbers,
    wall and CPU seconds, and the best-so-far (the best finished value up to that trial)."""
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    if frame.empty:
        return []
    pick = max if mode == "max" else min
    rows, best = [], None
    for rec in frame.sort_values("number").to_dict("records"):
        number = int(rec["number"])
        state = STATES.get(str(rec["state"]), str(rec["state"]).lower())
        status = {"complete": "ok", "pruned": "pruned", "running": "running", "waiting": "pending"}.get(
            state, _cell(rec, "user_attrs_status") or "interrupted")
        run_dir = _cell(rec, "user_attrs_run_dir")
        results = read_results(sweep_dir / run_dir) if run_dir else {m: None for m in METRICS}
        value = _cell(rec, "value")
        if state == "complete" and value is not None:
            best = value if best is None else pick(best, value)
        error = (_cell(rec, "user_attrs_error_tail") or "").splitlines()
        wall, cpu = _cell(rec, "user_attrs_wall_s"), _cell(rec, "user_attrs_cpu_s")
        rows.append({
            "run": run_dir.rsplit("/", 1)[-1] if run_dir else "", "trial": number, "state": state, "status": status,
            **{k: cli_value(rec[f"params_{k}"]) if _cell(rec, f"params_{k}") is not None else "" for k in keys},
            **{m: results[m] for m in METRICS if m != "wall_s"},
            "wall_s": None if wall is None else round(wall, 1), "cpu_s": None if cpu is None else round(cpu, 1),
            "best_so_far": best, "run_dir": run_dir or "", "error": error[-1] if error else "",
            "_error_tail": "\n".join(error), "_returncode": None if _cell(rec, "user_attrs_returncode") is None else int(rec["user_attrs_returncode"]),
            "_curve": results.get("_curve", [])})
    sign = -1 if mode == "max" else 1

    def order(row: dict[str, Any]) -> tuple:
        value, tie = row[metric], row["final_reward_mean"]
        return (STATUS_ORDER.get(row["status"], 9), value is None, sign * (value or 0), -(tie or 0), row["trial"])

    return sorted(rows, key=order)


def write_summary(study: optuna.Study, sweep_dir: Path, keys: list[str], metric: str, mode: str,
                  command: list[str]) -> str:
    """Rewrite summary.csv and summary.md, and the HPARAMS session of each newly finished trial;
    returns the markdown. The caller holds the sweep's lock (workers share these files)."""
    import csv
    import io

    rows = trial_rows(study, sweep_dir, keys, metric, mode)
    for row in rows:
        if row["status"] in ("ok", "pruned", "failed") and row["run"]:
            write_hparams(sweep_dir, row, keys)
    columns = ["run", "trial", "state", "status", *keys, *METRICS, "cpu_s", "best_so_far", "run_dir", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text_atomic(sweep_dir / "summary.csv", buf.getvalue())

    counts = {s: sum(r["status"] == s for r in rows) for s in STATUS_ORDER}
    best = study.best_trial.number if any(r["state"] == "complete" for r in rows) else None
    lines = [f"# Sweep `{study.study_name}`", "", f"`{shlex.join(['python', *command[1:]])}`", "",
             f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
             + (f"; best: trial {best}" if best is not None else "")
             + f". Sorted by `{metric}` ({mode}); eval success rate and mean reward: final = last iteration's "
             "eval, best = best iteration eval (baseline excluded); best so far = the best finished trial up "
             "to this one.", ""]
    md_cols = ["#", "run", "trial", "state", "status", *keys, "final success", "best success", "final reward",
               "best reward", "baseline success", "final iter", "wall (s)", "cpu (s)", "best so far"]
    lines += ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    for i, row in enumerate(rows, 1):
        cells = [str(i), f"[{row['run']}]({row['run_dir']})" if row["run"] else "", str(row["trial"]), row["state"],
                 row["status"], *(f"`{row.get(k, '')}`" for k in keys), *(fmt(row[m]) for m in METRICS[:-1]),
                 fmt(row["wall_s"] and round(row["wall_s"])), fmt(row["cpu_s"] and round(row["cpu_s"])),
                 fmt(row["best_so_far"])]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        if row["status"] == "failed":
            params = " ".join(f"{k}={row[k]}" for k in keys)
            lines += ["", f"## {row['run']} failed (exit code {row['_returncode']}): {params}", "",
                      "```", row["_error_tail"], "```", f"Full output: `{row['run_dir']}/output.log`"]
    md = "\n".join(lines) + "\n"
    write_text_atomic(sweep_dir / "summary.md", md)
    return md


def write_hparams(sweep_dir: Path, row: dict[str, Any], keys: list[str]) -> None:
    """One TensorBoard HPARAMS session per finished trial in ``tensorboard/version_K``: the swept
    values and the trial's state as hyperparameters, ``final/*``, ``best/*``, ``wall_s`` and
    ``cpu_s`` as its metrics, and the eval curves (``eval/success_rate``, ``eval/reward_mean``)
    by step. Written once; ``add_hparams`` marks every session successful, so the state column
    is what tells a pruned or failed trial apart."""
    from torch.utils.tensorboard import SummaryWriter

    folder = sweep_dir / "tensorboard" / row["run"]
    if folder.exists():
        return
    hparams = {**{k: typed(row[k]) for k in keys}, "state": row["state"]}
    metrics = {name: row[col] for name, col in [
        ("final/success_rate", "final_success_rate"), ("final/reward_mean", "final_reward_mean"),
        ("best/success_rate", "best_success_rate"), ("best/reward_mean", "best_reward_mean"),
        ("wall_s", "wall_s"), ("cpu_s", "cpu_s")] if row[col] is not None}
    curve = row["_curve"]
    last = curve[-1][0] if curve else 0
    with SummaryWriter(log_dir=str(folder)) as writer:
        for step, e in curve:
            for key in ("success_rate", "reward_mean"):
                if e.get(key) is not None:
                    writer.add_scalar(f"eval/{key}", e[key], step)
        writer.add_hparams(hparams, metrics, run_name=".", global_step=last)
