"""Sweeps: real tiny fit runs on configs/sat_tiny.yaml (a 2x2 grid shared by two worker
processes, a failing run, a pruned run, a stopped sweep) plus the cheap parts (parsing,
sampling, concurrent asks, resume planning, GPU sets) in-process."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from helpers import processes_with
from optuna.distributions import CategoricalDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState, create_trial

from grpo_lightning import sweep
from grpo_lightning.inference.launch import ServerConfig, server_env
from grpo_lightning.sweep import gpu_plan, parse_args
from grpo_lightning.sweep_study import Search, next_trial, params_of, recover, split_values

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "sat_tiny.yaml")
TINY = ["--trainer.max_epochs", "1", "--data.problems_per_iteration", "2", "--data.rollouts_per_problem", "2",
        "--data.eval.num_problems", "4", "--data.eval.replicates", "2", "--data.max_tokens", "8",
        "--checkpoint.keep_last", "1", "--model.num_iterations", "1", "--model.steps_per_iteration", "1",
        "--data.dynamic_sampling", "false"]


def run_dirs(sweep_dir: Path) -> set[str]:
    return {p.name for p in (sweep_dir / "runs").glob("version_*")}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def num(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def load_study(sweep_dir: Path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    return optuna.load_study(study_name=sweep_dir.name, storage=storage)


def server_pids(log: Path) -> list[int]:
    """The built-in servers a run launched, from its ``server.log``. A trial's first server is
    the process the trial forked before it started (``inference/prefork.py``)."""
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("=== server pid ")]
    assert lines and lines[0].endswith("(pre-forked, imports done)"), lines
    return [int(ln.split()[3]) for ln in lines]


def sweep_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "grpo_lightning", "sweep", *argv]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[int], list[str]]:
    """A 2x2 grid run by two sweep processes on one journal (``--parallel 1`` each)."""
    root = tmp_path_factory.mktemp("sweeps")
    argv = ["--config", CONFIG, "--grid", "model.lr=1e-3,3e-3", "--grid", "model.kl_coef=0,0.05",
            "--parallel", "1", "--root", str(root), "--name", "grid", "--", *TINY]
    procs = [subprocess.Popen(sweep_cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    return root / "grid", argv, [p.returncode for p in procs], outs


@pytest.mark.slow
def test_two_workers_share_a_grid_without_duplicates(grid: tuple[Path, list[str], list[int], list[str]]) -> None:
    sweep_dir, _, codes, outs = grid
    assert codes == [0, 0], outs
    trials = load_study(sweep_dir).get_trials()
    points = [(t.params["model.lr"], t.params["model.kl_coef"]) for t in trials]
    assert sorted(points) == [("1e-3", "0"), ("1e-3", "0.05"), ("3e-3", "0"), ("3e-3", "0.05")]  # no duplicate
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials
    started = [line for out in outs for line in out.splitlines() if line.startswith("start trial")]
    assert len(started) == 4
    assert run_dirs(sweep_dir) == {f"version_{t.number}" for t in trials}
    for t in trials:
        run_dir = sweep_dir / t.user_attrs["run_dir"]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["lr"] == float(t.params["model.lr"])
        assert config["model"]["kl_coef"] == float(t.params["model.kl_coef"])
        assert config["trainer"]["max_epochs"] == 1 and config["data"]["rollouts_per_problem"] == 2
        final = json.loads((run_dir / "metrics" / "eval_iter_000.json").read_text())
        assert t.value == final["success_rate"]  # the objective: final eval success
        assert t.intermediate_values == {1: final["success_rate"]}  # the baseline (step 0) is not reported
        assert (run_dir / "output.log").stat().st_size > 0
        assert len(server_pids(run_dir / "server.log")) == 1


@pytest.mark.slow
def test_a_trial_computes_what_a_fresh_fit_computes(grid: tuple[Path, list[str], list[int], list[str]],
                                                    tmp_path: Path) -> None:
    """A trial forked from the fork server, with its pre-forked built-in server, is the fit run it
    stands for: the same rollouts and evals as ``python -m grpo_lightning fit`` started fresh."""
    sweep_dir = grid[0]
    (trial,) = [t for t in load_study(sweep_dir).get_trials() if t.params == {"model.lr": "1e-3", "model.kl_coef": "0"}]
    fresh = subprocess.run([sys.executable, "-m", "grpo_lightning", "fit", "--config", CONFIG, *TINY, "--model.lr", "1e-3",
                            "--model.kl_coef", "0", "--trainer.logger.init_args.save_dir", str(tmp_path),
                            "--trainer.logger.init_args.name", "fresh"], capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    ours, theirs = sweep_dir / trial.user_attrs["run_dir"] / "metrics", tmp_path / "fresh" / "version_0" / "metrics"
    for name in ("eval_baseline.json", "train_iter_000.json", "eval_iter_000.json"):
        a, b = (json.loads((d / name).read_text()) for d in (ours, theirs))
        exact = [k for k in a if k.startswith(("reward/", "success", "reward_", "num_")) or k == "problem_seeds"]
        assert exact and {k: a[k] for k in exact} == {k: b[k] for k in exact}, name
        if "train/loss" in a:  # the same numbers up to float summation order
            assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_summary_comes_from_the_study(grid: tuple[Path, list[str], list[int], list[str]]) -> None:
    sweep_dir = grid[0]
    study = load_study(sweep_dir)
    rows = read_csv(sweep_dir / "summary.csv")
    assert len(rows) == 4
    by_trial = {t.number: t for t in study.get_trials()}
    for row in rows:
        t = by_trial[int(row["trial"])]
        metrics = sweep_dir / row["run_dir"] / "metrics"
        final = json.loads((metrics / "eval_iter_000.json").read_text())  # one iteration: final = best
        baseline = json.loads((metrics / "eval_baseline.json").read_text())
        assert row["state"] == "complete" and row["status"] == "ok" and row["final_iteration"] == "0"
        assert row["model.lr"] == t.params["model.lr"] and row["run"] == f"version_{t.number}"
        assert num(row["final_success_rate"]) == final["success_rate"] == num(row["best_success_rate"])
        assert num(row["final_reward_mean"]) == final["reward_mean"] == num(row["best_reward_mean"])
        assert num(row["baseline_success_rate"]) == baseline["success_rate"]
        assert float(row["wall_s"]) > 0 and float(row["cpu_s"]) > 0
        earlier = [u.value for n, u in by_trial.items() if n <= t.number]
        assert num(row["best_so_far"]) == max(earlier)
    ranked = [(num(r["final_success_rate"]), num(r["final_reward_mean"])) for r in rows]
    assert ranked == sorted(ranked, reverse=True)
    md = (sweep_dir / "summary.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "[version_" in ln]
    assert len(table) == 4
    for line, row in zip(table, rows, strict=True):
        assert f"[{row['run']}]" in line and f"{float(row['final_success_rate']):.4f}" in line
    assert f"best: trial {study.best_trial.number}" in md


@pytest.mark.slow
def test_tensorboard_hparams_plugin_sees_each_run(grid: tuple[Path, list[str], list[int], list[str]]) -> None:
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    sweep_dir = grid[0]
    logdir = str(sweep_dir / "tensorboard")
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, logdir)
    ctx = backend_context.Context(base_plugin.TBContext(logdir=logdir, multiplexer=mux, data_provider=provider))
    request = api_pb2.ListSessionGroupsRequest(
        allowed_statuses=[api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE], start_index=0, slice_size=100)
    groups = list_session_groups.Handler(context.RequestContext(), ctx, "", request).run().session_groups
    assert len(groups) == 4
    rows = {r["run"]: r for r in read_csv(sweep_dir / "summary.csv")}
    for group in groups:
        row = rows[group.sessions[0].name.split("/")[0]]
        assert group.hparams["model.lr"].number_value == float(row["model.lr"])
        assert group.hparams["model.kl_coef"].number_value == float(row["model.kl_coef"])
        assert group.hparams["state"].string_value == "complete"
        metrics = {m.name.tag: m.value for m in group.metric_values}
        assert metrics["final/success_rate"] == pytest.approx(float(row["final_success_rate"]), abs=1e-6)
        assert metrics["best/reward_mean"] == pytest.approx(float(row["best_reward_mean"]), abs=1e-6)


@pytest.mark.slow
def test_rerun_runs_nothing_twice(grid: tuple[Path, list[str], list[int], list[str]], capsys: pytest.CaptureFixture) -> None:
    sweep_dir, argv, _, _ = grid
    before = (sweep_dir / "summary.csv").read_text()
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 finished before" in out and "start trial" not in out
    assert len(load_study(sweep_dir).trials) == 4
    assert (sweep_dir / "summary.csv").read_text() == before


@pytest.mark.slow
def test_failed_run_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    # startup_timeout passes every check but no server is healthy after 10 ms.
    argv = ["--config", CONFIG, "--grid", "data.server.startup_timeout=0.01,180", "--parallel", "2",
            "--root", str(tmp_path), "--name", "fails", "--", *TINY]
    assert sweep.main(argv) == 1
    rows = {r["data.server.startup_timeout"]: r for r in read_csv(tmp_path / "fails" / "summary.csv")}
    assert rows["180"]["status"] == "ok" and num(rows["180"]["final_success_rate"]) is not None
    assert rows["0.01"]["status"] == "failed" and rows["0.01"]["state"] == "failed"
    assert "not healthy after 0.01s" in rows["0.01"]["error"]
    assert list(rows) == ["180", "0.01"]  # failed runs last
    failed = next(t for t in load_study(tmp_path / "fails").trials if t.state == TrialState.FAIL)
    assert failed.user_attrs["returncode"] != 0 and "error: builtin server at" in failed.user_attrs["error_tail"]
    md = (tmp_path / "fails" / "summary.md").read_text()
    assert "failed (exit code" in md and "not healthy after 0.01s" in md


@pytest.mark.slow
def test_pruned_trial_is_stopped_like_ctrl_c(tmp_path: Path) -> None:
    """Five finished trials with a perfect eval at every iteration: the median pruner stops the
    new trial at its first eval below them, by SIGTERM to its process group (server included)."""
    sweep_dir = tmp_path / "pruned"
    sweep_dir.mkdir()
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    study = optuna.create_study(storage=storage, study_name="pruned", direction="maximize")
    dist = {"data.eval.seed_start": CategoricalDistribution(["100000"])}
    for _ in range(5):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=1.0, params={"data.eval.seed_start": "100000"},
                                     distributions=dist, intermediate_values={1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}))
    argv = ["--config", CONFIG, "--grid", "data.eval.seed_start=100000", "--pruner", "median", "--root", str(tmp_path),
            "--name", "pruned", "--", *TINY[2:], "--trainer.max_epochs", "4", "--data.eval.interval", "1"]
    # the grid sampler sees 1 point and 5 trials without grid ids: it hands out the point.
    assert sweep.main(argv) == 0
    trials = load_study(sweep_dir).get_trials()[5:]
    assert len(trials) == 1 and trials[0].state == TrialState.PRUNED
    t = trials[0]
    assert 0 not in t.intermediate_values and min(t.intermediate_values) == 1
    assert max(t.intermediate_values) < 4  # stopped before its last iteration
    run_dir = sweep_dir / t.user_attrs["run_dir"]
    assert t.intermediate_values[1] == json.loads((run_dir / "metrics" / "eval_iter_000.json").read_text())["success_rate"]
    assert not (run_dir / "metrics" / "eval_iter_003.json").exists()
    (server,) = server_pids(run_dir / "server.log")
    assert not Path(f"/proc/{server}").exists() and not Path(f"/proc/{t.user_attrs['pid']}").exists()
    assert t.user_attrs["returncode"] == -signal.SIGTERM  # ended by the signal, as a fresh fit would
    assert t.user_attrs["cpu_s"] > 0  # counted although the run died by the signal
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["state"], r["status"]) for r in rows] == [("complete", "ok")] * 5 + [("pruned", "pruned")]


@pytest.mark.slow
def test_trial_process_is_the_fit_command(tmp_path: Path) -> None:
    """A trial forked from the fork server parses and exits as ``python -m grpo_lightning fit``
    would: its output in the log, its exit code, its CPU time."""
    log = tmp_path / "output.log"
    ok = sweep.FitProcess(["fit", "--config", CONFIG, "--model.lr", "0.0123", "--print_config"], log,
                          sweep.child_env(None, 1))
    assert ok.poll(block=True) == 0 and ok.cpu_s > 0
    printed = yaml.safe_load(log.read_text()[log.read_text().index("seed_everything:"):])
    assert printed["model"]["lr"] == 0.0123 and printed["trainer"]["max_epochs"] == 120
    bad = sweep.FitProcess(["fit", "--config", CONFIG, "--model.lrr", "1"], log, sweep.child_env(None, None))
    assert bad.poll(block=True) == 2
    assert log.read_text().splitlines()[-1].startswith("error: ") and "model.lrr" in log.read_text()


@pytest.mark.slow
def test_sigterm_stops_every_run_and_its_server(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "stopped"
    argv = ["--config", CONFIG, "--grid", "model.lr=1e-3,2e-3,3e-3", "--parallel", "2", "--root", str(tmp_path),
            "--name", "stopped", "--stop-timeout", "20", "--", *TINY[2:], "--trainer.max_epochs", "50"]

    done = threading.Event()

    def stop_when_servers_run() -> None:  # SIGTERM to this process, caught by the sweep's handler
        while not done.wait(0.2):
            if len(list(sweep_dir.glob("runs/*/server.log"))) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=stop_when_servers_run, daemon=True).start()
    try:
        rc = sweep.main(argv)
    finally:
        done.set()
    assert rc == 143
    trials = load_study(sweep_dir).get_trials()
    assert [(t.state, t.user_attrs["status"]) for t in trials] == [(TrialState.FAIL, "interrupted")] * 2
    assert {r["status"] for r in read_csv(sweep_dir / "summary.csv")} == {"interrupted"}
    servers = [pid for log in sweep_dir.glob("runs/*/server.log") for pid in server_pids(log)]
    assert len(servers) == 2
    assert not [pid for pid in servers if Path(f"/proc/{pid}").exists()] and not processes_with(str(sweep_dir))
    for t in trials:
        assert not Path(f"/proc/{t.user_attrs['pid']}").exists()


def test_bad_input_is_one_line_and_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = {
        "model.lrr=1e-3": "model.lrr",  # unknown key
        "model.lr=fast": "model.lr",  # wrong type
        "model.lr=1e-3,-1": "model.lr",  # module __init__ validation
        "data.rollouts_per_problem=4,1": "data.rollouts_per_problem",  # data module __init__ validation
        "trainer.max_epochs=1.5": "trainer.max_epochs",
    }
    for spec, key in cases.items():
        assert sweep.main(["--config", CONFIG, "--grid", spec, "--root", str(tmp_path)]) == 2, spec
        err = capsys.readouterr().err
        assert key in err and "no run started" in err, err
    assert list(tmp_path.iterdir()) == []
    # One line naming the option; exit code 2; nothing created.
    for argv, message in [
        (["--grid", "model.lr=1e-3", "--sample", "model.lr=uniform:0:1"], "swept more than once"),
        (["--grid", "model.lr=1e-3", "--", "--model.lr", "2e-3"], "also fixed"),
        (["--sample", "model.lr=loguniform:0:1"], "LOW > 0"),
        (["--sample", "model.lr=normal:0:1"], "unknown distribution"),
        (["--sample", "model.lr=uniform:-1:1", "--sample", "data.temperature=uniform:0.5:1"], "model.lr"),
        ([], "nothing to sweep"),
        (["--grid", "model.lr=1e-3", "--trials", "3"], "sweep seed_everything"),
        (["--grid", "model.lr=1e-3", "--sampler", "bayes"], "--sampler 'bayes': unknown sampler"),
        (["--grid", "model.lr=1e-3", "--pruner", "hyperband"], "--pruner 'hyperband': unknown pruner"),
        (["--sample", "model.lr=uniform:1e-4:1e-3", "--sampler", "grid"], "--sampler grid cannot draw --sample"),
        (["--grid", "model.lr=1e-3", "--storage", f"sqlite:///{tmp_path}/missing/dir/s.db"], "--storage sqlite:///"),
        (["--grid", "model.lr=1e-3", "--storage", "postgresql://nobody@127.0.0.1:1/x"], "--storage postgresql://"),
        (["--grid", "model.lr=1e-3", "--pruner", "asha", "--", "--trainer.max_epochs", "20"],
         "--pruner asha: data.eval.interval=20 with trainer.max_epochs=20"),
        (["--grid", "model.lr=1e-3", "--pruner", "median", "--metric", "wall_s"], "--pruner median: needs a --metric"),
    ]:
        assert sweep.main(["--config", CONFIG, "--root", str(tmp_path), *argv]) == 2, argv
        err = capsys.readouterr().err
        if message != "model.lr":  # a rejected sampler edge: the fit parser's own message
            assert err.count("\n") == 1 and message in err, err
        else:
            assert message in err and "no run started" in err, err
    assert list(tmp_path.iterdir()) == []


def test_random_search_is_seeded_bounded_and_log_uniform() -> None:
    def points(seed: int, n: int = 400) -> list[dict[str, str]]:
        return Search.from_args(["data.temperature=0.7,1.0"],
                                ["model.lr=loguniform:1e-6:1e-4", "model.kl_coef=uniform:0:0.1",
                                 "model.micro_batch_size=intuniform:1:4", "model.loss_type=choice:dapo,grpo"],
                                "random", n, seed).preview()

    first, again, other = points(0), points(0), points(1)
    assert first == again and first != other
    assert points(0, 10) == first[:10]  # trial n draws the same point whatever the budget
    lrs = [float(c["model.lr"]) for c in first]
    assert len(set(lrs)) == 400 and all(1e-6 <= x <= 1e-4 for x in lrs)
    assert 0.4 < sum(x < 1e-5 for x in lrs) / len(lrs) < 0.6  # half below the geometric mean
    assert abs(sum(math.log10(x) for x in lrs) / len(lrs) + 5) < 0.15
    kls = [float(c["model.kl_coef"]) for c in first]
    assert all(0 <= x <= 0.1 for x in kls) and 0.4 < sum(x < 0.05 for x in kls) / len(kls) < 0.6
    assert {c["model.micro_batch_size"] for c in first} == {"1", "2", "3", "4"}
    assert {c["model.loss_type"] for c in first} == {"dapo", "grpo"}
    assert {c["data.temperature"] for c in first} == {"0.7", "1.0"}  # grid values are choices here
    grid = Search.from_args(["model.lr=1,2,3", "model.kl_coef=0,1"], [], None, None, 0)
    assert grid.sampler == "grid" and grid.trials == 6
    assert sorted(map(str, grid.preview())) == sorted(map(str, grid.validation_points()))  # each point once


def _ask_grid(journal: str, lock: str, n: int, out: Any) -> None:
    from filelock import FileLock

    study = optuna.load_study(study_name="race", storage=JournalStorage(JournalFileBackend(journal)))
    search = Search.from_args(["model.lr=1,2,3,4", "model.kl_coef=0,1"], [], None, None, 0)
    for _ in range(n):
        with FileLock(lock):
            trial = next_trial(study, search, 0)
        out.put(None if trial is None else (trial.params["model.lr"], trial.params["model.kl_coef"]))


def test_concurrent_workers_never_get_the_same_grid_point(tmp_path: Path) -> None:
    """Three processes ask at once for the points of an 8-point grid. The study starts with 8
    trials that are not grid points, so every ask takes the sampler's random pick among the
    free points (the path where unsynchronised workers collide)."""
    import multiprocessing

    journal = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="race", storage=JournalStorage(JournalFileBackend(journal)))
    for _ in range(8):
        study.tell(study.ask({"x": CategoricalDistribution(["a"])}), state=TrialState.FAIL)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ask_grid, args=(journal, str(tmp_path / ".lock"), 4, out)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in range(12)]
    for p in procs:
        p.join(timeout=60)
    points = [g for g in got if g is not None]
    assert sorted(points) == [(lr, kl) for lr in "1234" for kl in "01"] and got.count(None) == 4


def test_default_name() -> None:
    assert split_values("1e-5,[0.9,0.95],{a: 1, b: 2}") == ["1e-5", "[0.9,0.95]", "{a: 1, b: 2}"]

    def name(*argv: str) -> str:
        args, fit_args = parse_args(list(argv))
        return sweep.Worker(args, fit_args, list(argv), Search.from_args(
            args.grid, args.sample, args.sampler, args.trials, args.seed)).name

    base = ["--config", CONFIG, "--grid", "model.lr=1,2", "--parallel", "2", "--", "--trainer.max_epochs", "2"]
    assert name(*base).startswith("sat_tiny-") and name(*base) == name(*base[:4], *base[6:])  # --parallel: same
    assert name(*base) == name(*base[:4], "--pruner", "asha", *base[4:])  # a pruner joins the same study
    assert name(*base[:-1], "3") != name(*base)  # other fit arguments: another sweep
    assert name(*base[:4], "--sampler", "tpe", *base[4:]) != name(*base)


def test_resume_plan(tmp_path: Path) -> None:
    """ok: nothing; interrupted with last.ckpt: retried in its own dir from it; failed or
    interrupted without a checkpoint: retried in a fresh dir; a running trial whose worker and
    run died (killed sweep): failed, then retried; a failed point that a later trial finished:
    nothing."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    dist = {"model.lr": CategoricalDistribution([str(i) for i in range(1, 8)])}
    dead = subprocess.Popen(["true"])
    dead.wait()
    cases = [("ok", TrialState.COMPLETE), ("interrupted", TrialState.FAIL), ("failed", TrialState.FAIL),
             ("interrupted", TrialState.FAIL), ("running", TrialState.RUNNING), ("failed", TrialState.FAIL),
             ("ok", TrialState.COMPLETE)]
    for i, (status, state) in enumerate(cases):
        study.enqueue_trial({"model.lr": str(min(i, 5) + 1)})  # trial 6 finishes trial 5's point
        trial = study.ask(dist)
        trial.set_user_attr("run_dir", f"runs/version_{i}")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
        trial.set_user_attr("pid", dead.pid)
        if status in ("interrupted", "failed"):
            trial.set_user_attr("status", status)
        if state != TrialState.RUNNING:
            study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    for i in (1, 4):
        (tmp_path / "runs" / f"version_{i}" / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / f"version_{i}" / "checkpoints" / "last.ckpt").touch()
    assert recover(study, tmp_path) == [1, 2, 3, 4]
    assert study.trials[4].state == TrialState.FAIL  # the dead sweep's running trial
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.user_attrs["retry_of"], t.user_attrs.get("run_dir"), t.user_attrs.get("resume_from")) for t in waiting] == [
        (1, "runs/version_1", "runs/version_1/checkpoints/last.ckpt"), (2, None, None), (3, None, None),
        (4, "runs/version_4", "runs/version_4/checkpoints/last.ckpt")]
    assert [params_of(t) for t in waiting] == [study.trials[i].params for i in (1, 2, 3, 4)]
    assert recover(study, tmp_path) == []  # queued once


def test_gpu_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    def sets(*argv: str) -> tuple:
        return gpu_plan(parse_args(["--config", CONFIG, "--grid", "model.lr=1", *argv])[0])

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert sets("--parallel", "2")[:2] == ([["3", "5"], ["6", "7"]], 2)
    assert sets("--parallel", "3")[:2] == ([["3"], ["5"], ["6"]], 1)
    assert sets("--parallel", "2", "--devices-per-run", "1")[:2] == ([["3"], ["5"]], 1)
    assert sets()[:2] == (None, 0)  # one run at a time sees every GPU
    assert sets("--parallel", "8", "--devices-per-run", "0")[:2] == (None, 0)  # share
    with pytest.raises(ValueError, match="needs 6 GPUs"):
        sets("--parallel", "3", "--devices-per-run", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cores = len(os.sched_getaffinity(0))
    assert sets("--parallel", "2") == (None, 0, max(1, cores // 2))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = sweep.child_env(["6", "7"], 3)
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7" and env["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert sweep.child_env(None, 3)["OMP_NUM_THREADS"] == "5"  # a value the user set wins
    # Inside a run (CUDA_VISIBLE_DEVICES=6,7), data.server.gpu=1 is the run's second GPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env["CUDA_VISIBLE_DEVICES"])
    assert server_env(ServerConfig(gpu=1, env={"HF_HOME": "/x"})) == {"CUDA_VISIBLE_DEVICES": "7", "HF_HOME": "/x"}
