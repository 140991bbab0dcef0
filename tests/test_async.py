"""Generation that runs ahead of training (``data.max_staleness``).

The schedule (which policy version samples which iteration, no request in flight during a
sync, failures of the generation thread) is tested on the service with a stand-in generator
and sync; the end-to-end runs check the same on the real built-in server, with a server killed
while running ahead and a trainer SIGKILLed with rollouts in flight.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_same_iteration, load, without_times
from test_faults import API_KEY, BASE, Trainers

from grpo_lightning.cli import build_cli, main
from grpo_lightning.data import RolloutDataModule, _accepted_seeds
from grpo_lightning.envs.sat import SATEnv
from grpo_lightning.inference.client import SamplingParams, ServerUnavailable
from grpo_lightning.inference.launch import ManagedServer, ServerConfig
from grpo_lightning.inference.service import RolloutRecipe, RolloutService
from grpo_lightning.inference.weight_sync import SyncReport
from grpo_lightning.module import STALE_TIS_CAP, GRPOModule
from grpo_lightning.rollouts import Rollout

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "sat_tiny.yaml")


# ---------------------------------------------------------------------- the schedule


class StandInServer:
    managed, urls, adapter, pid, recoveries, served_weights, model = True, ["http://127.0.0.1:9"], None, None, 0, None, "m"
    config = ServerConfig()

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def client(self, tokenizer=None) -> None:
        return None


class Schedule:
    """A service whose generation, evaluation and sync are stand-ins that record what ran on
    which served version, and check that nothing generates while a sync runs."""

    def __init__(self, monkeypatch, k: int, fail_at: int | None = None) -> None:
        recipe = RolloutRecipe(train_seeds=list(range(100)), problems_per_iteration=2, rollouts_per_problem=2, seed=7,
                               sampling=SamplingParams(max_tokens=4))
        self.service = RolloutService(StandInServer(), None, SATEnv, recipe, max_staleness=k)
        self.service.start()
        self.generated: list[tuple[int, int]] = []  # (iteration, version served while it generated)
        self.evaluated: list[int] = []
        self.in_flight = 0
        self.overlaps = 0
        self.lock = threading.Lock()
        self.fail_at = fail_at

        def iteration(j: int, version: int | None = None):
            with self.lock:
                self.in_flight += 1
            try:
                time.sleep(0.01)
                if j == self.fail_at:
                    raise ServerUnavailable(f"server lost while generating iteration {j}")
                self.generated.append((j, self.service.version))
                seeds = recipe.iteration_seeds(j)
                tag = j if version is None else version  # as RolloutService.iteration
                rollouts = [Rollout(s, 0, [1], [2], [-0.1], "stop", "", 0.0, {}, False, policy_version=tag)
                            for s in seeds]
                return [rollouts], {"problem_seeds": seeds}
            finally:
                with self.lock:
                    self.in_flight -= 1

        def evaluate():
            with self.lock:
                self.in_flight += 1
            time.sleep(0.01)
            self.evaluated.append(self.service.version)
            with self.lock:
                self.in_flight -= 1
            return {"success_rate": 0.0}, []

        def sync(server, folder, probe=None):
            with self.lock:
                self.overlaps += self.in_flight
            return SyncReport(seconds=0.0, method="disk", verified=True)

        self.service.iteration, self.service.evaluate = iteration, evaluate
        monkeypatch.setattr("grpo_lightning.inference.service.sync_weights", sync)

    def train(self, start: int, end: int) -> list[tuple[int, list[int], dict]]:
        """The trainer's side: take each iteration's rollouts, 'train', sync, evaluate."""
        seen = []
        for i in range(start, end):
            rollouts, stats = self.service.rollouts(i, end=end)
            seen.append((i, [r.policy_version for r in rollouts], stats))
            time.sleep(0.02)
            self.service.sync(Path("/nonexistent"), reason="iteration", version=i + 1)
            evaluation = self.service.submit_evaluation()
        evaluation.result()  # the last one is waited for (as the evaluation callback does)
        self.service.stop()
        return seen


@pytest.mark.parametrize("k", [1, 2, 3])
def test_iteration_j_is_sampled_by_the_policy_after_max_0_j_minus_k_iterations(monkeypatch, k: int) -> None:
    run = Schedule(monkeypatch, k)
    seen = run.train(0, 6)
    for i, versions, stats in seen:
        assert versions == [max(0, i - k)] * 2, (i, versions)
        assert stats["problem_seeds"] == [2 * i, 2 * i + 1]  # the iteration rule, whatever k
        assert stats["time/wait_rollouts_s"] >= 0 and stats["time/server_idle_s"] >= 0
    assert sorted(run.generated) == [(j, max(0, j - k)) for j in range(6)]  # each once, nothing past the end
    assert run.overlaps == 0  # no generation or evaluation was running during a sync
    assert run.evaluated == [1, 2, 3, 4, 5, 6]  # the evaluation after iteration i: version i + 1


def test_a_resumed_run_regenerates_what_was_ahead_on_the_restored_weights(monkeypatch) -> None:
    run = Schedule(monkeypatch, k=2)
    run.service.version = 3  # the restored weights are the policy after 3 iterations
    seen = run.train(3, 7)
    assert [versions[0] for _, versions, _ in seen] == [3, 3, 3, 4]  # max(3, j - 2): fresher, never older
    assert run.overlaps == 0


def test_synchronous_runs_no_thread(monkeypatch) -> None:
    run = Schedule(monkeypatch, k=0)
    seen = run.train(0, 3)
    assert [versions[0] for _, versions, _ in seen] == [0, 1, 2]
    assert run.service._thread is None and threading.active_count() >= 1
    assert [t.name for t in threading.enumerate() if t.name.startswith(("rollouts-ahead", "evaluation"))] == []


def test_a_failure_of_the_generation_thread_is_the_runs_error(monkeypatch) -> None:
    run = Schedule(monkeypatch, k=1, fail_at=2)
    with pytest.raises(ServerUnavailable, match="server lost while generating iteration 2"):
        run.train(0, 5)
    run.service.stop()
    assert not any(t.name == "rollouts-ahead" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
def test_max_staleness_must_be_a_whole_number(value) -> None:
    with pytest.raises(ValueError, match=r"^data.max_staleness=.* must be a whole number >= 0"):
        RolloutDataModule(max_staleness=value)


@pytest.mark.parametrize(("value", "code"), [("-1", 1), ("1.5", 2)])
def test_bad_max_staleness_is_one_line_naming_the_key(value: str, code: int, capsys, tmp_path: Path) -> None:
    assert main(["fit", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path),
                 f"--data.max_staleness={value}"]) == code
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert "data.max_staleness" in line and "Traceback" not in err


@pytest.mark.parametrize(("args", "cap"), [([], None), (["--data.max_staleness", "1"], STALE_TIS_CAP),
                                         (["--data.max_staleness", "2", "--model.tis_cap", "3"], 3.0)])
def test_stale_rollouts_are_clipped_against_the_trainers_own_logprobs(args: list[str], cap, tmp_path: Path) -> None:
    """With ``max_staleness >= 1`` the PPO ratio is taken against the trainer's log-probabilities
    at the start of the iteration, and the staleness corrected by TIS (``model.tis_cap``, by
    default ``STALE_TIS_CAP``); the synchronous loop keeps the server's log-probabilities."""
    cli = build_cli(["--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path), *args], run=False)
    assert cli.model.hparams.max_staleness == cli.datamodule.max_staleness
    assert cli.model.loss_config.tis_cap == cap


@pytest.mark.parametrize(("args", "message"), [
    (["--model.proximal_logprobs", "loglinear"], "model.proximal_logprobs=loglinear"),  # k = 0
    (["--model.proximal_logprobs", "exact", "--data.max_staleness", "1"], "model.proximal_logprobs"),
])
def test_bad_proximal_logprobs_is_one_line_naming_the_key(args: list[str], message: str, capsys, tmp_path: Path) -> None:
    assert main(["fit", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path), *args]) != 0
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert message in line and "Traceback" not in err


# ---------------------------------------------------------------------- end to end

# The fault suite's small iteration (4 problems x 4, 6 eval problems, eval every iteration,
# fewer requests in flight than an iteration has, so a server killed at the first answer has
# requests left), with two optimizer steps and TIS: the old-policy logprobs are precomputed.
TINY = [*BASE, "--model.steps_per_iteration", "2", "--model.tis_cap", "2.0", "--model.lr", "1e-3",
        "--trainer.max_epochs", "3"]


# How long a forked run may take before the test fails (a stuck run must not hang the suite;
# a loaded 2-core machine needs minutes for a launched server and three iterations).
DEADLINE = 1200


def fit(save_dir: Path, name: str, *extra: str) -> Path:
    assert main(["fit", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(save_dir),
                 "--trainer.logger.init_args.name", name, *TINY, *extra]) == 0
    return save_dir / name / "version_0"


def seeds_of(run: Path, i: int) -> list[int]:
    env = SATEnv(max_difficulty=0.34)
    seeds = _accepted_seeds(env, 0, 2000)
    return [seeds[(i * 4 + j) % len(seeds)] for j in range(4)]


def rollout_part(m: dict) -> dict:
    """What the server sampled and the environment scored (not the training statistics)."""
    return {k: v for k, v in m.items() if k.startswith(("reward", "rollout/")) or k == "problem_seeds"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("async")
    return {"k1": fit(out, "k1", "--data.max_staleness", "1"),
            "k2": fit(out, "k2", "--data.max_staleness", "2", "--data.eval.num_problems", "0")}


@pytest.mark.slow
def test_trained_rollouts_are_exactly_k_versions_old_at_most(runs: dict[str, Path]) -> None:
    for name, k in (("k1", 1), ("k2", 2)):
        for i in range(3):
            m = load(runs[name] / "metrics" / f"train_iter_{i:03d}.json")
            assert m["rollout/policy_version"] == max(0, i - k), (name, i)
            assert m["rollout/staleness_max"] == m["rollout/staleness_mean"] == i - max(0, i - k) <= k
            assert m["problem_seeds"] == seeds_of(runs[name], i)
            assert m["time/wait_rollouts_s"] >= 0 and m["time/server_idle_s"] >= 0
            assert 0 < m["train/tis/weight_mean"] <= 2.0 and m["train/optimizer_steps"] == 2
    # Iteration 1 of both runs: the same problems and sampling seeds on the same weights
    # (version 0): the same completions and rewards.
    a, b = (load(runs[n] / "metrics" / "train_iter_001.json") for n in ("k1", "k2"))
    assert rollout_part(a) == rollout_part(b)
    # The evaluation after each iteration ran (beside the generation ahead) on its weights.
    evals = {p.name: load(p)["step"] for p in (runs["k1"] / "metrics").glob("eval_*.json")}
    assert evals == {"eval_baseline.json": 0, "eval_iter_000.json": 1, "eval_iter_001.json": 2, "eval_iter_002.json": 3}


@pytest.mark.slow
def test_every_tensorboard_scalar_is_in_a_group(runs: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["k1"]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [t for t in tags if "/" not in t] == []  # no hp_metric placeholder, no loose rollout scalars
    for tag in ("rollout/staleness_max", "rollout/policy_version", "rollout/completion_tokens_mean",
                "time/wait_rollouts_s", "time/server_idle_s"):
        assert tag in tags, tag
    assert [e.value for e in acc.Scalars("rollout/policy_version")] == [0, 0, 1]


@pytest.mark.slow
def test_loglinear_proximal_logprobs_need_no_forward_pass(monkeypatch, tmp_path: Path) -> None:
    """``proximal_logprobs: loglinear`` trains on the same rollouts without the
    start-of-iteration forward pass that ``recompute`` runs over them."""
    forwards: list[bool] = []
    logprobs = GRPOModule.logprobs

    def counted(self, model, batch, with_entropy: bool):
        forwards.append(with_entropy)  # training's forward asks for the entropy, the precompute's does not
        return logprobs(self, model, batch, with_entropy)

    monkeypatch.setattr(GRPOModule, "logprobs", counted)
    counts, runs = {}, {}
    for method in ("recompute", "loglinear"):
        forwards.clear()
        runs[method] = fit(tmp_path, method, "--data.max_staleness", "1", "--data.eval.num_problems", "0",
                           "--trainer.max_epochs", "2", "--model.proximal_logprobs", method)
        counts[method] = (forwards.count(True), forwards.count(False))
    # 2 iterations x 2 micro-batches (16 rollouts, 2 steps of 8); recompute's 2 more per iteration.
    assert counts == {"recompute": (4, 4), "loglinear": (4, 0)}
    errors = []
    for i in range(2):  # both iterations sampled by version 0: the same rollouts
        a, b = (load(runs[m] / "metrics" / f"train_iter_{i:03d}.json") for m in ("recompute", "loglinear"))
        assert rollout_part(a) == rollout_part(b) and b["rollout/staleness_max"] == i
        assert 0 < b["train/tis/weight_mean"] <= 2.0
        assert "train/proximal/loglinear_abs_error" not in b
        errors.append(a["train/proximal/loglinear_abs_error"])
    # recompute logs how far the interpolation is from the exact values. Iteration 0 trains
    # on its own policy's rollouts: the current policy at step 0 and the server's numbers at
    # step 1 are the exact ones up to float noise. Iteration 1's rollouts are a version old:
    # at its second step the interpolation is an estimate.
    assert errors[0] < 1e-4 < errors[1]


@pytest.mark.slow
def test_a_server_killed_while_running_ahead_is_restarted_and_the_requests_sent_again(runs: dict[str, Path], tmp_path: Path) -> None:
    run = fit(tmp_path, "kill", "--data.max_staleness", "1",
              "--trainer.callbacks+=fault_probes.KillAhead", "--trainer.callbacks.iteration", "2")
    assert (run / "killed_server_at_epoch").read_text() == "1"  # while iteration 1 trained
    for i in range(3):
        killed, clean = (load(r / "metrics" / f"train_iter_{i:03d}.json") for r in (run, runs["k1"]))
        assert killed.pop("server/restarts") == (1 if i == 2 else 0)
        clean.pop("server/restarts")
        assert_same_iteration(killed, clean, f"iteration {i}")  # the same seeds, so the same rollouts
    log = (run / "server.log").read_text()
    starts = re.findall(r"starting: .* --model (\S+) ", log)
    assert len(starts) == 2 and starts[1] == str(run / "sync_weights")  # on the newest weights (version 1)


@pytest.mark.slow
def test_a_trainer_killed_with_rollouts_in_flight_resumes_from_last(tmp_path: Path) -> None:
    trainers = Trainers(tmp_path / "trainers")
    (tmp_path / "trainers").mkdir()
    common = [*TINY, "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "sigkill",
              "--data.max_staleness", "1"]
    killed = trainers.run("killed", [*common, "--trainer.callbacks+=fault_probes.KillAhead",
                                     "--trainer.callbacks.iteration", "2", "--trainer.callbacks.target", "self"],
                          timeout=DEADLINE)
    assert killed.exitcode == -signal.SIGKILL
    run = tmp_path / "sigkill" / "version_0"
    assert (run / "killed_self_at_epoch").read_text() == "1"
    done = {p.name: p.stat().st_mtime_ns for p in (run / "metrics").glob("train_iter_*.json")}
    assert set(done) == {"train_iter_000.json"}
    first = load(run / "metrics" / "train_iter_000.json")
    resumed = trainers.run("resumed", [*common, "--ckpt_path", "last"], timeout=DEADLINE)
    assert resumed.exitcode == 0, resumed.stderr[-3000:]
    assert (run / "metrics" / "train_iter_000.json").stat().st_mtime_ns == done["train_iter_000.json"]
    assert without_times(load(run / "metrics" / "train_iter_000.json")) == without_times(first)
    versions = [load(run / "metrics" / f"train_iter_{i:03d}.json")["rollout/policy_version"] for i in range(3)]
    assert versions == [0, 1, 1]  # iteration 1 regenerated on the restored weights: fresher than k allows
    for i in range(3):  # no problem skipped or repeated
        assert load(run / "metrics" / f"train_iter_{i:03d}.json")["problem_seeds"] == seeds_of(run, i)
    evals = sorted(p.name for p in (run / "metrics").glob("eval_iter_*.json"))
    assert evals == ["eval_iter_000.json", "eval_iter_001.json", "eval_iter_002.json"]


@pytest.mark.slow
def test_an_attached_server_lost_while_running_ahead_stops_the_run_in_one_line(tmp_path: Path) -> None:
    """The generation thread's failure is the run's: one line, exit code 1, no hang."""
    config = ServerConfig(api_key=API_KEY, device="cpu", startup_timeout=300, extra_args=["--num-threads", "1"])
    trainers = Trainers(tmp_path / "trainers")
    (tmp_path / "trainers").mkdir()
    with ManagedServer(config, model="tiny-sat", log_path=tmp_path / "server.log") as doomed:
        run = trainers.run("lost", [*TINY, "--trainer.logger.init_args.save_dir", str(tmp_path),
                                    "--trainer.logger.init_args.name", "lost", "--data.max_staleness", "1",
                                    "--data.server.urls", f"[{doomed.urls[0]}]", "--data.eval.num_problems", "0",
                                    "--trainer.callbacks+=fault_probes.KillAhead", "--trainer.callbacks.iteration", "2",
                                    "--trainer.callbacks.target", str(doomed.pid)], timeout=DEADLINE)
    assert run.exitcode == 1 and "Traceback" not in run.stderr
    [line] = [x for x in run.stderr.splitlines() if x.startswith("error:")]
    assert doomed.urls[0] in line and "during iteration 2: generating" in line and "--ckpt_path last" in line
    assert load(tmp_path / "lost" / "version_0" / "metrics" / "train_iter_000.json")["rollout/policy_version"] == 0
