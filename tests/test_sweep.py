"""Sweeps: real tiny fit runs on configs/sat_tiny.yaml (a 2x2 grid, a failing run, a stopped
sweep) plus the cheap parts (parsing, sampling, resume planning, GPU sets) in-process."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import processes_with

from grpo_lightning import sweep
from grpo_lightning.inference.launch import ServerConfig, server_env
from grpo_lightning.sweep import Distribution, Sweep, gpu_plan, parse_args, plan, split_values

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


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], int, float]:
    root = tmp_path_factory.mktemp("sweeps")
    argv = ["--config", CONFIG, "--grid", "model.lr=1e-3,3e-3", "--grid", "model.kl_coef=0,0.05",
            "--parallel", "2", "--root", str(root), "--name", "grid", "--", *TINY]
    t0 = time.monotonic()
    rc = sweep.main(argv)
    return root / "grid", argv, rc, time.monotonic() - t0


@pytest.mark.slow
def test_grid_runs_every_combination(grid: tuple[Path, list[str], int, float]) -> None:
    sweep_dir, _, rc, seconds = grid
    print(f"2x2 grid, --parallel 2: {seconds:.0f}s")
    assert rc == 0
    assert run_dirs(sweep_dir) == {f"version_{i}" for i in range(4)}
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    seen = set()
    for entry in manifest["runs"]:
        assert entry["status"] == "ok", entry
        run_dir = sweep_dir / "runs" / f"version_{entry['version']}"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        lr, kl = entry["overrides"]["model.lr"], entry["overrides"]["model.kl_coef"]
        assert config["model"]["lr"] == float(lr) and config["model"]["kl_coef"] == float(kl)
        assert config["trainer"]["max_epochs"] == 1 and config["data"]["rollouts_per_problem"] == 2
        assert (run_dir / "output.log").stat().st_size > 0
        seen.add((lr, kl))
    assert seen == {("1e-3", "0"), ("1e-3", "0.05"), ("3e-3", "0"), ("3e-3", "0.05")}

    rows = read_csv(sweep_dir / "summary.csv")
    assert len(rows) == 4
    for row in rows:
        metrics = sweep_dir / row["run_dir"] / "metrics"
        final = json.loads((metrics / "eval_iter_000.json").read_text())  # one iteration: final = best
        baseline = json.loads((metrics / "eval_baseline.json").read_text())
        assert row["status"] == "ok" and row["final_iteration"] == "0"
        assert num(row["final_success_rate"]) == final["success_rate"] == num(row["best_success_rate"])
        assert num(row["final_reward_mean"]) == final["reward_mean"] == num(row["best_reward_mean"])
        assert num(row["baseline_success_rate"]) == baseline["success_rate"]
        assert float(row["wall_s"]) > 0
        config = yaml.safe_load((sweep_dir / row["run_dir"] / "config.yaml").read_text())
        assert config["model"]["lr"] == float(row["model.lr"])
    ranked = [(num(r["final_success_rate"]), num(r["final_reward_mean"])) for r in rows]
    assert ranked == sorted(ranked, reverse=True)
    md = (sweep_dir / "summary.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "[version_" in ln]
    assert len(table) == 4
    for line, row in zip(table, rows, strict=True):
        assert f"[{row['run']}]" in line and f"{float(row['final_success_rate']):.4f}" in line


@pytest.mark.slow
def test_tensorboard_hparams_plugin_sees_each_run(grid: tuple[Path, list[str], int, float]) -> None:
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
        row = rows[group.name]
        assert group.hparams["model.lr"].number_value == float(row["model.lr"])
        assert group.hparams["model.kl_coef"].number_value == float(row["model.kl_coef"])
        metrics = {m.name.tag: m.value for m in group.metric_values}
        assert metrics["eval/success_rate"] == pytest.approx(float(row["final_success_rate"]), abs=1e-6)
        assert metrics["best/reward_mean"] == pytest.approx(float(row["best_reward_mean"]), abs=1e-6)
        assert group.sessions[0].status == api_pb2.STATUS_SUCCESS


@pytest.mark.slow
def test_rerun_skips_finished_runs(grid: tuple[Path, list[str], int, float], capsys: pytest.CaptureFixture) -> None:
    sweep_dir, argv, _, _ = grid
    before = (sweep_dir / "summary.csv").read_text()
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 combinations, 0 to run" in out and out.count("finished OK") == 4
    assert run_dirs(sweep_dir) == {f"version_{i}" for i in range(4)}
    assert (sweep_dir / "summary.csv").read_text() == before


@pytest.mark.slow
def test_failed_run_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    # startup_timeout passes every check but no server is healthy after 10 ms.
    argv = ["--config", CONFIG, "--grid", "data.server.startup_timeout=0.01,180", "--parallel", "2",
            "--root", str(tmp_path), "--name", "fails", "--", *TINY]
    assert sweep.main(argv) == 1
    rows = {r["data.server.startup_timeout"]: r for r in read_csv(tmp_path / "fails" / "summary.csv")}
    assert rows["180"]["status"] == "ok" and num(rows["180"]["final_success_rate"]) is not None
    assert rows["0.01"]["status"] == "failed" and "not healthy after 0.01s" in rows["0.01"]["error"]
    assert list(rows) == ["180", "0.01"]  # failed runs last
    manifest = json.loads((tmp_path / "fails" / "sweep.json").read_text())
    failed = next(r for r in manifest["runs"] if r["status"] == "failed")
    assert failed["returncode"] != 0 and "error: builtin server at" in failed["error_tail"]
    md = (tmp_path / "fails" / "summary.md").read_text()
    assert "failed (exit code" in md and "not healthy after 0.01s" in md


@pytest.mark.slow
def test_sigterm_stops_every_run_and_its_server(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "stopped"
    argv = ["--config", CONFIG, "--grid", "model.lr=1e-3,2e-3,3e-3", "--parallel", "2", "--root", str(tmp_path),
            "--name", "stopped", "--stop-timeout", "20", "--", "--trainer.max_epochs", "50"]

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
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["interrupted", "interrupted", "pending"]
    ports = [log.read_text().split("--port ")[1].split()[0] for log in sweep_dir.glob("runs/*/server.log")]
    alive = [pid for needle in [*(f"--port {p} " for p in ports), str(sweep_dir)] for pid in processes_with(needle)]
    assert not alive
    for r in manifest["runs"][:2]:
        assert not Path(f"/proc/{r['pid']}").exists()


def test_invalid_values_are_rejected_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
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
    for argv, message in [
        (["--grid", "model.lr=1e-3", "--sample", "model.lr=uniform:0:1"], "swept more than once"),
        (["--grid", "model.lr=1e-3", "--", "--model.lr", "2e-3"], "also fixed"),
        (["--sample", "model.lr=loguniform:0:1"], "LOW > 0"),
        (["--sample", "model.lr=normal:0:1"], "unknown distribution"),
        ([], "nothing to sweep"),
        (["--grid", "model.lr=1e-3", "--trials", "3"], "sweep seed_everything"),
    ]:
        assert sweep.main(["--config", CONFIG, "--root", str(tmp_path), *argv]) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sampling_is_seeded_bounded_and_log_uniform() -> None:
    samples = [("model.lr", Distribution.parse("model.lr", "loguniform:1e-6:1e-4")),
               ("model.kl_coef", Distribution.parse("model.kl_coef", "uniform:0:0.1")),
               ("model.micro_batch_size", Distribution.parse("model.micro_batch_size", "intuniform:1:4")),
               ("model.loss_type", Distribution.parse("model.loss_type", "choice:dapo,grpo"))]
    grid = [("data.temperature", ["0.7", "1.0"])]
    first, again, other = plan(grid, samples, 400, 0), plan(grid, samples, 400, 0), plan(grid, samples, 400, 1)
    assert first == again and first != other
    assert len(first) == 800
    assert [c["model.lr"] for c in first[:400]] == [c["model.lr"] for c in first[400:]]  # grid x same samples
    lrs = [float(c["model.lr"]) for c in first[:400]]
    assert all(1e-6 <= x <= 1e-4 for x in lrs)
    assert 0.4 < sum(x < 1e-5 for x in lrs) / len(lrs) < 0.6  # half below the geometric mean
    assert abs(sum(math.log10(x) for x in lrs) / len(lrs) + 5) < 0.15
    kls = [float(c["model.kl_coef"]) for c in first[:400]]
    assert all(0 <= x <= 0.1 for x in kls) and 0.4 < sum(x < 0.05 for x in kls) / len(kls) < 0.6
    assert {c["model.micro_batch_size"] for c in first} == {"1", "2", "3", "4"}
    assert {c["model.loss_type"] for c in first} == {"dapo", "grpo"}


def test_grid_values_and_default_name() -> None:
    assert split_values("1e-5,[0.9,0.95],{a: 1, b: 2}") == ["1e-5", "[0.9,0.95]", "{a: 1, b: 2}"]

    def name(*argv: str) -> str:
        return Sweep(*parse_args(list(argv)), argv=list(argv)).name

    base = ["--config", CONFIG, "--grid", "model.lr=1,2", "--parallel", "2", "--", "--trainer.max_epochs", "2"]
    assert name(*base).startswith("sat_tiny-") and name(*base) == name(*base[:4], *base[6:])  # --parallel: same
    assert name(*base[:-1], "3") != name(*base)  # other fit arguments: another sweep


def test_resume_plan(tmp_path: Path) -> None:
    """ok: skipped; interrupted with last.ckpt: resumed in place; failed or interrupted without a
    checkpoint: a fresh version dir; pending (never started): its reserved version."""
    argv = ["--config", CONFIG, "--grid", "model.lr=1,2,3,4,5,6", "--root", str(tmp_path), "--name", "s"]
    s = Sweep(*parse_args(argv), argv=argv)
    s.runs = [sweep.Run({"model.lr": str(i + 1)}, i, status) for i, status in
              enumerate(["ok", "interrupted", "failed", "interrupted", "running", "pending"])]
    for i in range(5):
        (s.dir / "runs" / f"version_{i}").mkdir(parents=True)
    for i in (1, 4):
        (s.dir / "runs" / f"version_{i}" / "checkpoints").mkdir()
        (s.dir / "runs" / f"version_{i}" / "checkpoints" / "last.ckpt").touch()
    s.save()
    s = Sweep(*parse_args(argv), argv=argv)
    s.load()
    todo = s.prepare()
    assert [r.overrides["model.lr"] for r in s.skipped] == ["1"]
    assert [(r.overrides["model.lr"], r.version, r.resume_from) for r in todo] == [
        ("2", 1, "runs/version_1/checkpoints/last.ckpt"), ("3", 6, None), ("4", 7, None),
        ("5", 4, "runs/version_4/checkpoints/last.ckpt"), ("6", 5, None)]
    assert todo[1].previous_run_dirs == ["runs/version_2"] and all(r.status == "pending" for r in todo)


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
