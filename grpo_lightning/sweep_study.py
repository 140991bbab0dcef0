"""A sweep's Optuna side: the search space from ``--grid`` / ``--sample``, the sampler, the
pruner, the storage, and which trial a worker runs next.

Kept apart from ``sweep`` (processes, signals, the command line) so that the study logic reads
on its own: everything here talks to Optuna, nothing here starts a process.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "asha")
DISTRIBUTIONS = ("uniform", "loguniform", "intuniform", "choice")
JOURNAL = "study.journal"
# Seeds of successive asks are far apart so that trial n's draw never repeats trial m's.
SEED_STRIDE = 1_000_003
ASHA_REDUCTION = 3  # see make_pruner

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is the sweep's own


# ---------------------------------------------------------------------------- the command line


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
    return key, list(dict.fromkeys(vals))


@dataclass(frozen=True)
class Distribution:
    """``uniform:a:b``, ``loguniform:a:b`` (uniform in log space), ``intuniform:a:b`` (both
    ends included) or ``choice:x,y,z``, as the Optuna distribution the sampler draws from."""

    kind: str
    args: tuple[str, ...]

    @classmethod
    def parse(cls, key: str, text: str) -> Distribution:
        kind, _, rest = text.partition(":")
        if kind == "choice":
            args = tuple(dict.fromkeys(split_values(rest)))
            if not rest or any(a == "" for a in args):
                raise ValueError(f"--sample {key}: choice needs values, e.g. choice:a,b,c")
            return cls(kind, args)
        if kind not in DISTRIBUTIONS:
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

    def optuna(self) -> BaseDistribution:
        if self.kind == "choice":
            return CategoricalDistribution(self.args)
        if self.kind == "intuniform":
            return IntDistribution(int(self.args[0]), int(self.args[1]))
        return FloatDistribution(float(self.args[0]), float(self.args[1]), log=self.kind == "loguniform")

    def edges(self) -> list[str]:
        """The values that bound what the sampler can draw: both ends, or every choice."""
        return list(self.args)


def parse_sample(spec: str) -> tuple[str, Distribution]:
    key, sep, dist = spec.partition("=")
    key = key.strip().lstrip("-")
    if not key or not sep:
        raise ValueError(f"--sample {spec!r}: expected KEY=DIST:ARGS (e.g. model.lr=loguniform:1e-6:1e-4)")
    return key, Distribution.parse(key, dist.strip())


def cli_value(value: Any) -> str:
    """A trial parameter as a ``fit`` argument: grid values and choices are the text the user
    wrote; sampled floats are written with ``repr`` so the run gets exactly the stored value."""
    return value if isinstance(value, str) else repr(value)


def combo_id(params: dict[str, Any]) -> str:
    """A point's identity: its parameters in key order (``--grid`` order is free)."""
    return json.dumps(sorted((k, cli_value(v)) for k, v in params.items()))


# ---------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class Search:
    """What a sweep searches and how: the space, the sampler, its seed and the trial budget."""

    grid: tuple[tuple[str, tuple[str, ...]], ...]
    samples: tuple[tuple[str, Distribution], ...]
    sampler: str
    seed: int
    trials: int

    @classmethod
    def from_args(cls, grid: list[str], sample: list[str], sampler: str | None, trials: int | None,
                  seed: int) -> Search:
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"--sampler {sampler!r}: unknown sampler (one of {', '.join(SAMPLERS)})")
        g = tuple((k, tuple(v)) for k, v in map(parse_grid, grid))
        s = tuple(map(parse_sample, sample))
        keys = [k for k, _ in g] + [k for k, _ in s]
        if not keys:
            raise ValueError("nothing to sweep: give at least one --grid KEY=V1,V2 or --sample KEY=DIST")
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"swept more than once: {', '.join(dup)}")
        sampler = sampler or ("random" if s else "grid")
        if sampler == "grid" and s:
            raise ValueError("--sampler grid cannot draw --sample distributions; use --grid values, "
                             "or --sampler random / tpe")
        size = 1
        for _, values in g:
            size *= len(values)
        if sampler == "grid" and trials is not None:
            raise ValueError(f"--trials: the grid sampler runs each of the {size} grid points once; "
                             "to repeat a run, sweep seed_everything instead")
        if trials is not None and trials < 1:
            raise ValueError("--trials must be at least 1")
        return cls(g, s, sampler, seed, size if sampler == "grid" else (trials or 1))

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.grid] + [k for k, _ in self.samples]

    def distributions(self) -> dict[str, BaseDistribution]:
        """Grid keys are categorical: the grid sampler walks them, random / TPE pick among them."""
        return {**{k: CategoricalDistribution(v) for k, v in self.grid}, **{k: d.optuna() for k, d in self.samples}}

    def spec(self) -> dict[str, Any]:
        """The search as stored in the study: a second worker must search the same space."""
        return {"grid": {k: list(v) for k, v in self.grid},
                "sample": {k: f"{d.kind}:{':'.join(d.args)}" for k, d in self.samples},
                "sampler": self.sampler, "seed": self.seed}

    def make_sampler(self, trial_number: int) -> optuna.samplers.BaseSampler:
        """The sampler for the ``trial_number``-th ask, seeded by the seed and that number.

        Every worker rebuilds it per ask (the history lives in the storage, not in the sampler),
        so two workers started with the same ``--seed`` do not draw the same sequence, and a
        random search draws the same points whichever worker asks. The grid sampler keeps the
        plain seed: it shuffles the grid with it, and grid ids must mean the same point to all."""
        if self.sampler == "grid":  # its seed orders the grid: the same in every worker
            return optuna.samplers.GridSampler({k: list(v) for k, v in self.grid}, seed=self.seed)
        seed = self.seed * SEED_STRIDE + trial_number
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # Optuna's default of 10 random start-up trials would leave a 12-trial search random;
        # constant_liar keeps parallel workers from all proposing the same promising point.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, self.trials // 3)),
                                          constant_liar=True)

    def validation_points(self) -> list[dict[str, str]]:
        """The points checked by the ``fit`` parser before any trial starts: every grid point for
        the grid sampler; for random / TPE every grid value and both ends (or every choice) of
        each distribution, one key at a time, so each value the sampler can reach is bounded by
        a checked one."""
        if self.sampler == "grid":
            keys = [k for k, _ in self.grid]
            return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in self.grid))]
        options = {**{k: list(v) for k, v in self.grid}, **{k: d.edges() for k, d in self.samples}}
        base = {k: v[0] for k, v in options.items()}
        points = [base]
        for key, values in options.items():
            points += [{**base, key: v} for v in values[1:]]
        return points

    def preview(self) -> list[dict[str, str]]:
        """The points a fresh study draws first (exactly the grid, or the first ``trials`` asks of
        a random / TPE study that has no results yet), from an in-memory study."""
        study = optuna.create_study()
        out = []
        for n in range(self.trials):
            study.sampler = self.make_sampler(n)
            trial = study.ask(self.distributions())
            out.append({k: cli_value(trial.params[k]) for k in self.keys})
        return out


# ---------------------------------------------------------------------------- pruning


def make_pruner(name: str, first_eval: int) -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose eval is below the median of the other trials' evals at the
    same iteration (after 5 trials have finished). ``asha``: asynchronous successive halving,
    rungs at ``first_eval`` x 3^k iterations, keeping the best third of each rung: a third
    rather than Optuna's default quarter, because a short run's early evals differ by little
    more than their noise, and a trial cut at a rung never comes back."""
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_eval, reduction_factor=ASHA_REDUCTION)
    return optuna.pruners.NopPruner()


def check_pruner(name: str, metric: str, interval: int, max_epochs: int, num_problems: int) -> None:
    """A pruner needs an eval before the last iteration: the last one cannot save anything."""
    if name not in PRUNERS:
        raise ValueError(f"--pruner {name!r}: unknown pruner (one of {', '.join(PRUNERS)})")
    if name == "none":
        return
    if eval_key(metric) is None:
        raise ValueError(f"--pruner {name}: needs a --metric read from the evals (success rate or reward), not {metric}")
    if num_problems <= 0 or interval >= max_epochs:
        raise ValueError(f"--pruner {name}: data.eval.interval={interval} with trainer.max_epochs={max_epochs} "
                         f"and data.eval.num_problems={num_problems} gives no eval before the last iteration "
                         "to prune on; lower data.eval.interval")


def eval_key(metric: str) -> str | None:
    """The field of ``metrics/eval_iter_*.json`` that the pruner compares for ``metric``."""
    for key in ("success_rate", "reward_mean"):
        if metric in (f"final_{key}", f"best_{key}"):
            return key
    return None


# ---------------------------------------------------------------------------- storage


def open_storage(url: str | None, sweep_dir: Path) -> optuna.storages.BaseStorage:
    """``--storage``: an RDB URL (``sqlite:///x.db``, ``postgresql://...``), a journal file path,
    or nothing: ``<sweep_dir>/study.journal``. Several workers (processes, or machines with the
    file on a shared filesystem) append to one journal; Optuna locks it per write."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        if url is not None and "://" in url:
            return optuna.storages.RDBStorage(url)
        path = Path(url) if url is not None else sweep_dir / JOURNAL
        if url is None:
            path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as exc:  # sqlalchemy / OS / import errors: all mean "cannot open"
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ValueError(f"--storage {url}: cannot open it ({type(exc).__name__}: {lines[0]})") from None


def open_study(storage: optuna.storages.BaseStorage, name: str, direction: str, spec: dict[str, Any],
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study, or join it when it exists (a rerun, or another worker) if it searches
    the same thing; a different search under the same name is refused."""
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, pruner=pruner,
                                load_if_exists=True)
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", spec)
    elif stored != json.loads(json.dumps(spec)):
        diff = sorted(k for k in spec if stored.get(k) != json.loads(json.dumps(spec[k])))
        raise ValueError(f"--name {name}: the study holds a sweep with other {', '.join(diff)} "
                         f"({ {k: stored.get(k) for k in diff} }); use another --name")
    return study


# ---------------------------------------------------------------------------- what runs next


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(worker: str | None, pid: int | None) -> bool:
    """Whether a trial's worker or its ``fit`` process may still run. Only this host's
    processes can be checked; another host's trial is assumed alive."""
    host, _, wpid = (worker or "").rpartition(":")
    if host != socket.gethostname():
        return True
    for p in (int(wpid) if wpid.isdigit() else None, pid):
        if p:
            try:
                os.kill(p, 0)
                return True
            except ProcessLookupError:
                pass
            except PermissionError:
                return True
    return False


def status_of(t: FrozenTrial) -> str:
    """The run's status in the tables: ok, pruned, running, pending, failed or interrupted."""
    if t.state == TrialState.FAIL:
        return t.user_attrs.get("status", "interrupted")
    return {TrialState.COMPLETE: "ok", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running",
            TrialState.WAITING: "pending"}[t.state]


def params_of(t: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters; a queued (waiting) trial has them only as its fixed parameters."""
    return t.params or t.system_attrs.get("fixed_params", {})


def recover(study: optuna.Study, sweep_dir: Path) -> list[int]:
    """Before a worker asks for its first trial: fail the running trials of workers on this
    host that died (they cannot be told any more), and queue one retry of each failed or
    interrupted point that nothing else covers: an interrupted run continues from its
    ``checkpoints/last.ckpt`` in its own dir, the others start afresh. Returns the retried."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not alive(t.user_attrs.get("worker"), t.user_attrs.get("pid")):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    covered = {combo_id(params_of(t)) for t in trials if t.state != TrialState.FAIL}
    queued = []
    for t in trials:
        if t.state != TrialState.FAIL or t.number in retried or combo_id(t.params) in covered or not t.params:
            continue
        attrs: dict[str, Any] = {"retry_of": t.number}
        run_dir = t.user_attrs.get("run_dir")
        if status_of(t) == "interrupted" and run_dir and (sweep_dir / run_dir / "checkpoints" / "last.ckpt").is_file():
            attrs.update(run_dir=run_dir, resume_from=f"{run_dir}/checkpoints/last.ckpt")
        study.enqueue_trial(t.params, user_attrs=attrs)
        covered.add(combo_id(t.params))
        queued.append(t.number)
    return queued


def next_trial(study: optuna.Study, search: Search, failed_here: int) -> optuna.Trial | None:
    """Ask for the next trial, or None when the search is done for this worker.

    Queued retries go first. Then the grid sampler hands out each grid point once (a failed
    point is not retried until the sweep runs again); random / TPE ask until ``trials`` trials
    are complete, pruned or running (this worker's own failures count, so a config that always
    fails does not loop). The caller holds the sweep's lock: two workers never ask at once, so
    the grid sampler never sees a point as free that another worker is being handed."""
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.WAITING for t in trials):
        if search.sampler == "grid":
            taken = {t.system_attrs["grid_id"] for t in trials if "grid_id" in t.system_attrs}
            if len(taken) >= search.trials:
                return None
        else:
            live = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) for t in trials)
            if live + failed_here >= search.trials:
                return None
    study.sampler = search.make_sampler(len(trials))
    try:
        return study.ask(search.distributions())
    finally:
        # GridSampler.after_trial calls Study.stop, which raises outside Study.optimize; the
        # worker decides itself when the grid is done (above), so tell() runs without it.
        study.sampler = optuna.samplers.RandomSampler()
