"""Fault injection: what goes wrong during an overnight run, and proof that the run survives it
or stops in one line with a resumable state. Run alone with ``uv run pytest -m faults``.

Trainers that get SIGKILLed run as forked children of a fork server that imported the
trainer once (``run_cli``), so a kill costs no interpreter start. Faults strike by phase (see
``fault_probes``), against the real built-in server; the one fake is a stopped (SIGSTOP)
server standing in for a hung one.

One chain of runs (``chain``) carries most of the evidence; it uses one run directory:

==  =====================  ==========================================================================
L1  managed server         iteration 1: the server is SIGKILLed mid-generation (restarted), its
                           loss is NaN (step skipped); iteration 2: the trainer is SIGKILLed
                           mid-generation (its restarted server must follow it down)
L2  attached server        resume; SIGKILL after the first micro-batch of iteration 2
L3  attached server        resume; SIGKILL during the evaluation after iteration 2
L4  attached server        resume; SIGKILL while ``last.ckpt`` of iteration 2 is half written
L5  attached server        resume (redoes iteration 2); the server is SIGKILLed mid-generation
                           of iteration 3: the run stops in one line with a resumable state
L6  attached server        the server is back; resume: iteration 3, the run completes
==  =====================  ==========================================================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import multiprocessing
import multiprocessing.forkserver
import os
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from helpers import assert_same_iteration, load, processes_with, wait_until, without_times
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from grpo_lightning.callbacks import AtomicCheckpointIO
from grpo_lightning.cli import GRPOTrainer, main
from grpo_lightning.data import RolloutDataModule, _accepted_seeds
from grpo_lightning.envs import ENVIRONMENTS, StepResult
from grpo_lightning.envs.sat import CLOSE_TAG, OPEN_TAG, SATEnv, format_answer, generate_problem
from grpo_lightning.inference.client import (
    Completion,
    GenerationRequest,
    RetriesExhausted,
    RolloutClient,
    SamplingParams,
    ServerUnavailable,
)
from grpo_lightning.inference.launch import ManagedServer, ServerConfig, free_port
from grpo_lightning.inference.server import build_parser
from grpo_lightning.inference.service import RolloutService
from grpo_lightning.inference.weights import folder_checksum
from grpo_lightning.models import load_policy, resolve_model_path
from grpo_lightning.module import GRPOModule
from grpo_lightning.rollouts import RolloutGenerator

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "sat_tiny.yaml")
API_KEY = "fault-suite-key"
BASE = [
    "--data.problems_per_iteration", "4",
    "--data.rollouts_per_problem", "4",
    "--data.eval.num_problems", "6",
    "--data.eval.replicates", "2",
    "--data.eval.interval", "1",
    "--data.max_tokens", "24",
    # One optimizer step per iteration in two micro-batches: every rollout is scored by the
    # trainer before the update, so ``train/mismatch`` compares the server's weights to the
    # trainer's.
    "--model.micro_batch_size", "8",
    "--model.num_iterations", "1",
    "--model.steps_per_iteration", "1",
    "--data.dynamic_sampling", "false",  # the iteration rule's problems, checked seed by seed
    "--data.server.api_key", API_KEY,
    "--data.server.max_retries", "1",
    "--data.server.backoff", "0.1",
    # Fewer requests in flight than the 4 of an iteration: a server killed when the first
    # answer arrives has requests still to serve, however fast it answered the others.
    "--data.server.max_concurrency", "2",
]


def kill(phase: str, iteration: int, target: str = "self", batch: int = 0) -> list[str]:
    return ["--trainer.callbacks+=fault_probes.Kill", "--trainer.callbacks.phase", phase,
            "--trainer.callbacks.iteration", str(iteration), "--trainer.callbacks.target", target,
            "--trainer.callbacks.batch", str(batch)]


def nonfinite(iterations: list[int], loss_batches: list[int] = (), grad_batches: list[int] = ()) -> list[str]:
    return ["--trainer.callbacks+=fault_probes.NonFinite", "--trainer.callbacks.iterations", str(list(iterations)),
            "--trainer.callbacks.loss_batches", str(list(loss_batches)),
            "--trainer.callbacks.grad_batches", str(list(grad_batches))]


def logger(save_dir: Path, name: str) -> list[str]:
    return ["--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", name]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def policy_of(ckpt: Path) -> dict[str, torch.Tensor]:
    state = AtomicCheckpointIO().load_checkpoint(ckpt)["state_dict"]
    return {k.removeprefix("policy."): v for k, v in state.items()}


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())




# ---------------------------------------------------------------------- fixtures


@dataclass
class Launch:
    exitcode: int
    stderr: str
    pid: int


class Trainers:
    """Forks trainer processes (``fit`` runs) from a fork server that imported the trainer once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["grpo_lightning.cli", "transformers.models.qwen2.modeling_qwen2"])
        # Starts the import in the background while the inference server starts.
        multiprocessing.forkserver.ensure_running()

    def run(self, name: str, argv: list[str], timeout: float = 300) -> Launch:
        import fault_probes

        proc = self.ctx.Process(target=fault_probes.run_cli, args=(["fit", "--config", CONFIG, *argv], str(self.folder / name)))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            pytest.fail(f"{name} did not finish within {timeout}s")
        stderr = (self.folder / f"{name}.err").read_text(errors="replace")
        return Launch(proc.exitcode, stderr, proc.pid)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory) -> Trainers:
    return Trainers(tmp_path_factory.mktemp("trainers"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, trainers) -> Iterator[ManagedServer]:
    """A real built-in server with an API key and tightened request limits (through
    ``ServerConfig.extra_args``), attached to by the runs below."""
    config = ServerConfig(
        api_key=API_KEY,
        device="cpu",
        startup_timeout=180,
        extra_args=["--max-request-bytes", "262144", "--max-n", "8", "--num-threads", "1"],
    )
    with ManagedServer(config, model="tiny-sat", log_path=tmp_path_factory.mktemp("server") / "server.log") as s:
        yield s


def attached(server: ManagedServer) -> list[str]:
    return ["--data.server.urls", f"[{server.urls[0]}]"]


@dataclass
class Chain:
    run: Path
    launches: dict[str, Launch] = field(default_factory=dict)
    leftover_servers: list[int] = field(default_factory=list)
    after_l1: dict[str, int] = field(default_factory=dict)
    after_l4: dict[str, object] = field(default_factory=dict)
    after_l5: dict[str, object] = field(default_factory=dict)

    def metrics(self, i: int) -> dict:
        return load(self.run / "metrics" / f"train_iter_{i:03d}.json")


@pytest.fixture(scope="module")
def chain(trainers: Trainers, server: ManagedServer, tmp_path_factory) -> Chain:
    out = tmp_path_factory.mktemp("chain")
    c = Chain(run=out / "chain" / "version_0")
    common = [*BASE, *logger(out, "chain"), "--trainer.max_epochs", "4",
              "--checkpoint.save_interval", "1", "--checkpoint.keep_last", "0"]
    resume = [*common, *attached(server), "--ckpt_path", "last"]
    metrics = c.run / "metrics"

    c.launches["L1"] = trainers.run("L1", [*common, *kill("generation", 1, target="server"),
                                           *nonfinite([1], loss_batches=[0]), *kill("generation", 2)])
    needle = f"--parent-pid {c.launches['L1'].pid}"
    wait_until(lambda: not processes_with(needle), 30)
    c.leftover_servers = processes_with(needle)
    c.after_l1 = {p.name: p.stat().st_mtime_ns for p in metrics.glob("train_iter_*.json")}

    c.launches["L2"] = trainers.run("L2", [*resume, *kill("training", 2, batch=0)])
    c.launches["L3"] = trainers.run("L3", [*resume, *kill("evaluation", 2)])
    c.launches["L4"] = trainers.run("L4", [*resume, *kill("checkpoint", 2)])
    tmp = c.run / "checkpoints" / "last.ckpt.tmp"
    c.after_l4 = {
        "tmp_size": tmp.stat().st_size if tmp.exists() else None,
        "last_size": (c.run / "checkpoints" / "last.ckpt").stat().st_size,
        "last_epoch": torch.load(c.run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"],
        "train_002": load(metrics / "train_iter_002.json"),
        "eval_002": without_times(load(metrics / "eval_iter_002.json")),
        "weights_002": load_file(c.run / "checkpoints" / "iter_002" / "model.safetensors"),
    }

    c.launches["L5"] = trainers.run("L5", [*resume, *kill("generation", 3, target=str(server.pid))])
    c.after_l5 = {
        "last_epoch": torch.load(c.run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"],
        "mtimes": {p.name: p.stat().st_mtime_ns for p in metrics.glob("train_iter_*.json")},
    }
    server.stop()
    server.start()  # the operator brings the server back
    c.launches["L6"] = trainers.run("L6", resume)
    return c


# ---------------------------------------------------------------------- 1. server faults


def test_unreachable_server_fails_within_the_deadline_in_one_line(trainers: Trainers, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    run = trainers.run("unreachable", [*BASE, *logger(tmp_path, "down"), "--data.server.urls", f"[{url}]",
                                       "--data.server.startup_timeout", "3"])
    assert run.exitcode == 1
    assert "Traceback" not in run.stderr
    [line] = error_lines(run.stderr)
    assert url in line and "not healthy after 3s" in line and "ConnectError" in line
    # The bound is the code's: the message names the 3 s deadline the health wait gave up at
    # (the wall time of a loaded machine is not measured here).


def test_hung_server_times_out_per_request_then_recovers(server: ManagedServer) -> None:
    client = RolloutClient(server.urls, api_key=API_KEY, request_timeout=1.0, max_retries=1, backoff=0.1)
    request = GenerationRequest([1, 2, 3], n=2, seed=0, params=SamplingParams(max_tokens=4))
    os.kill(server.pid, signal.SIGSTOP)  # alive, accepting connections, answering nothing
    try:
        with pytest.raises(RetriesExhausted) as err:
            client.generate([request])
        message = str(err.value)
        assert "\n" not in message and server.urls[0] in message and "no answer within 1s" in message
    finally:
        os.kill(server.pid, signal.SIGCONT)
    [[a, b]] = client.generate([request])
    assert len(a.token_ids) == len(a.logprobs) >= 1 and b.finish_reason in ("stop", "length")


def test_managed_server_killed_mid_generation_is_restarted_on_the_current_weights(chain: Chain) -> None:
    assert chain.launches["L1"].exitcode == -signal.SIGKILL
    m0, m1 = chain.metrics(0), chain.metrics(1)
    assert m0["server/restarts"] == 0 and m1["server/restarts"] == 1
    assert m1["reward/num_completions"] == 16 and len(m1["problem_seeds"]) == 4  # nothing dropped
    log = (chain.run / "server.log").read_text()
    starts = re.findall(r"starting: .* --model (\S+) ", log)
    assert len(starts) == 2 and starts[1] == str(chain.run / "sync_weights")
    served = re.findall(r"serving \S+ \(cpu, float32, checksum (\w+)\)", log)
    after_iteration_0 = folder_checksum(chain.run / "checkpoints" / "iter_000", "float32")
    original = folder_checksum(resolve_model_path("tiny-sat"), "float32")
    assert served == [original, after_iteration_0] and original != after_iteration_0
    # The restarted server's logprobs are the trainer's: it serves the weights being trained.
    assert m1["train/mismatch/abs_max"] < 1e-4
    assert "restarting it on" in chain.launches["L1"].stderr


def test_killed_trainer_takes_its_managed_server_down(chain: Chain) -> None:
    assert chain.leftover_servers == []
    assert "parent process" in (chain.run / "server.log").read_text()


def test_attached_server_lost_stops_cleanly_and_resumes(chain: Chain, server: ManagedServer) -> None:
    lost = chain.launches["L5"]
    assert lost.exitcode == 1 and "Traceback" not in lost.stderr
    [line] = error_lines(lost.stderr)
    assert server.urls[0] in line and "during iteration 3: generating" in line
    assert "retry budget" in line and "--ckpt_path last" in line
    # The stop left iteration 2 complete in last.ckpt: the resume starts at iteration 3.
    assert chain.after_l5["last_epoch"] == 2
    assert chain.launches["L6"].exitcode == 0, chain.launches["L6"].stderr[-3000:]
    final = {p.name: p.stat().st_mtime_ns for p in (chain.run / "metrics").glob("train_iter_*.json")}
    assert set(final) == {f"train_iter_{i:03d}.json" for i in range(4)}
    assert set(chain.after_l5["mtimes"]) == {f"train_iter_{i:03d}.json" for i in range(3)}
    assert all(final[name] == t for name, t in chain.after_l5["mtimes"].items())


def test_attached_server_lost_at_the_weight_sync_stops_in_one_line(trainers: Trainers, tmp_path: Path) -> None:
    """The server dies after iteration 1's rollouts were answered, just before its new weights
    are pushed: the sync retries with the generation budget, then the run stops like a lost
    generation would, with iteration 0 resumable."""
    config = ServerConfig(api_key=API_KEY, device="cpu", startup_timeout=180, extra_args=["--num-threads", "1"])
    with ManagedServer(config, model="tiny-sat", log_path=tmp_path / "server.log") as doomed:
        run = trainers.run("sync-lost", [
            *BASE, *logger(tmp_path, "sync"), *attached(doomed), "--trainer.max_epochs", "2",
            "--data.eval.num_problems", "0", *kill("sync", 1, target=str(doomed.pid)),
        ])
    assert run.exitcode == 1 and "Traceback" not in run.stderr
    [line] = error_lines(run.stderr)
    assert f"{doomed.urls[0]}/update_weights_from_disk got no answer after 2 attempts" in line
    assert "during the weight sync (iteration)" in line and "data.server.max_retries=1" in line
    assert "--ckpt_path last" in line
    folder = tmp_path / "sync" / "version_0"
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in (folder / "metrics").glob("train_iter_*.json")) == ["train_iter_000.json"]


class FailingGenerator:
    def __init__(self) -> None:
        self.calls = 0

    def generate(self, seeds, n, seed_tag, on_done=None):
        self.calls += 1
        raise RetriesExhausted("request 0 failed after 2 attempts (http://127.0.0.1:9): connection refused")


class CountingServer:
    def __init__(self, managed: bool, config: ServerConfig) -> None:
        self.managed, self.urls, self.model, self.served_weights = managed, ["http://127.0.0.1:9"], "tiny-sat", None
        self.recoveries, self.config = 0, config

    def recover(self) -> float:
        self.recoveries += 1
        return 0.0


@pytest.mark.parametrize("managed", [True, False])
def test_a_server_that_keeps_failing_stops_the_run_after_max_restarts(managed: bool) -> None:
    config = ServerConfig(max_restarts=2, urls=None if managed else ["http://127.0.0.1:9"])
    service = RolloutService(CountingServer(managed, config), None, SATEnv, RolloutDataModule().recipe)
    gen = FailingGenerator()
    with pytest.raises(ServerUnavailable) as err, warnings.catch_warnings(record=True) as logged:
        warnings.simplefilter("always")
        service.generate(gen, [1, 2], 2, "tag", "iteration 0: generating")
    restarts_logged = [w for w in logged if "restarting it on tiny-sat" in str(w.message)]
    assert len(restarts_logged) == (2 if managed else 0)
    if managed:
        assert (gen.calls, service.restarts) == (3, 2)
        assert "kept failing after 2 restarts (data.server.max_restarts=2)" in str(err.value)
    else:  # an attached server is never ours to restart
        assert (gen.calls, service.restarts) == (1, 0)
        assert "retry budget" in str(err.value) and "--ckpt_path last" in str(err.value)


# ---------------------------------------------------------------------- 2. crash and resume


def test_sigkill_anywhere_resumes_losing_only_the_iteration_in_progress(chain: Chain) -> None:
    for name in ("L1", "L2", "L3", "L4"):
        assert chain.launches[name].exitcode == -signal.SIGKILL, (name, chain.launches[name].stderr[-2000:])
    for name in ("L2", "L3", "L4", "L5", "L6"):
        assert "weights synced to the server (resume" in chain.launches[name].stderr, name
    # Iterations 0 and 1 finished in L1 and were never redone.
    final = {p.name: p.stat().st_mtime_ns for p in (chain.run / "metrics").glob("train_iter_*.json")}
    assert all(final[name] == t for name, t in chain.after_l1.items()) and len(chain.after_l1) == 2
    # L4 died writing iteration 2's last.ckpt: an orphan half-written .tmp, last.ckpt untouched.
    assert chain.after_l4["tmp_size"] is not None and chain.after_l4["tmp_size"] < chain.after_l4["last_size"]
    assert chain.after_l4["last_epoch"] == 1
    # L5 resumed from iteration 1's checkpoint and redid iteration 2: the same rollouts, rewards
    # and evaluation, the same weights up to float noise.
    assert_same_iteration(chain.metrics(2), chain.after_l4["train_002"])
    assert without_times(load(chain.run / "metrics" / "eval_iter_002.json")) == chain.after_l4["eval_002"]
    redone = load_file(chain.run / "checkpoints" / "iter_002" / "model.safetensors")
    assert max((redone[k] - w).abs().max().item() for k, w in chain.after_l4["weights_002"].items()) < 1e-5
    # Same problems as an uninterrupted run, and the server served the trainer's weights in
    # every iteration (restart, four resumes, a server that came back with other weights).
    config = yaml.safe_load((chain.run / "config.yaml").read_text())["data"]
    seeds = _accepted_seeds(SATEnv(**config["env_args"]), config["train_seed_start"], config["num_train_seeds"])
    for i in range(4):
        m = chain.metrics(i)
        assert m["problem_seeds"] == [seeds[(i * 4 + j) % len(seeds)] for j in range(4)]
        assert m["train/mismatch/abs_max"] < 1e-4, i
    last = torch.load(chain.run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 3 and all_finite(last["state_dict"])


# ---------------------------------------------------------------------- 3. numerical faults


def test_nonfinite_loss_skips_the_step_counts_it_and_the_run_goes_on(chain: Chain) -> None:
    counts = [(chain.metrics(i)["train/optimizer_steps"], chain.metrics(i)["train/nonfinite_steps_skipped"]) for i in range(4)]
    assert counts == [(1, 0), (0, 1), (1, 0), (1, 0)]
    ckpts = chain.run / "checkpoints"
    before, skipped, after = (load_file(ckpts / f"iter_{i:03d}" / "model.safetensors") for i in range(3))
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # the skipped step changed nothing
    assert any(not torch.equal(skipped[k], after[k]) for k in before)  # and training went on
    assert all_finite(after)


def test_nonfinite_streak_stops_with_the_last_good_weights(trainers: Trainers, server: ManagedServer, tmp_path: Path) -> None:
    """Non-finite gradients (finite loss) in both steps of iteration 1, with at most 2 allowed in
    a row: the run stops in one line, and the weights it names are finite and the last good ones."""
    run = trainers.run("nan-stop", [
        *BASE, *logger(tmp_path, "nan"), *attached(server), "--trainer.max_epochs", "3",
        "--data.eval.num_problems", "0", "--model.steps_per_iteration", "2",
        "--model.max_consecutive_nonfinite", "2", *nonfinite([1], grad_batches=[0, 1]),
    ])
    assert run.exitcode == 1 and "Traceback" not in run.stderr
    [line] = error_lines(run.stderr)
    folder = tmp_path / "nan" / "version_0" / "checkpoints"
    assert "2 consecutive optimizer steps" in line and "model.max_consecutive_nonfinite=2" in line
    assert str(folder / "last_good") in line and str(folder / "last.ckpt") in line
    good = load_file(folder / "last_good" / "model.safetensors")
    last = policy_of(folder / "last.ckpt")
    assert all_finite(good) and all_finite(last)
    assert all(torch.equal(good[k], last[k]) for k in good)  # both skipped: still iteration 0's weights
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "nan" / "version_0" / "metrics" / "train_iter_001.json").exists()


class NaNEnv(SATEnv):
    """A user's environment with a bug: NaN reward for odd seeds, infinite for seed 6."""

    name = "nan-sat"

    def step(self, completion: str) -> StepResult:
        result = super().step(completion)
        seed = int(self.problem.seed)
        reward = math.inf if seed == 6 else (math.nan if seed % 2 else result.reward)
        return StepResult(reward, result.components, result.success)


class StubClient:
    def __init__(self, text: str) -> None:
        self.text = text

    def generate(self, requests: list[GenerationRequest], on_done=None) -> list[list[Completion]]:
        return [[Completion(r.prompt_ids, [1, 2], [-0.5, -0.5], "stop", self.text)] * r.n for r in requests]


def test_nonfinite_rewards_from_an_environment_score_as_the_minimum(monkeypatch, tiny_tokenizer) -> None:
    monkeypatch.setitem(ENVIRONMENTS, "nan-sat", NaNEnv)
    answer = format_answer(generate_problem(4).solution)
    gen = RolloutGenerator(StubClient(answer), tiny_tokenizer, lambda: NaNEnv(), SamplingParams(max_tokens=4))
    with pytest.warns(UserWarning, match=r"'nan-sat' returned a NaN or infinite reward for 4 completions \(seed 5 replicate 0"):
        groups = gen.generate([4, 5, 6], n=2, seed_tag="t")
    lo = NaNEnv().reward_bounds[0]
    assert [[r.reward for r in g] for g in groups] == [[pytest.approx(SATEnv().reward_bounds[1])] * 2, [lo, lo], [lo, lo]]
    assert [r.success for g in groups for r in g] == [True, True, False, False, False, False]
    assert gen.nonfinite_rewards == [(5, 0), (5, 1), (6, 0), (6, 1)]


# ---------------------------------------------------------------------- 4. bad input


CONFIG_ERRORS = {
    "unknown key": (["--model.lrate", "1e-3"], 2, "--model.lrate"),
    "wrong type": (["--data.rollouts_per_problem", "many"], 2, "data.rollouts_per_problem"),
    "unknown choice": (["--data.server.backend", "tgi"], 2, "data.server.backend"),
    "group of one": (["--data.rollouts_per_problem", "1"], 1, "data.rollouts_per_problem=1"),
    "negative lr": (["--model.lr=-1e-3"], 1, "model.lr=-0.001"),
    "infinite lr": (["--model.lr", "inf"], 2, "model.lr"),
    "eval interval 0": (["--data.eval.interval", "0"], 1, "data.eval.interval=0"),
    "more steps than rollouts": (["--model.steps_per_iteration", "17"], 1, "model.steps_per_iteration (17)"),
    "no non-finite step allowed": (["--model.max_consecutive_nonfinite", "0"], 1, "model.max_consecutive_nonfinite=0"),
    "negative retries": (["--data.server.max_retries=-1"], 1, "data.server.max_retries=-1"),
    "zero request timeout": (["--data.server.request_timeout", "0"], 1, "data.server.request_timeout=0.0"),
    "port out of range": (["--data.server.port", "70000"], 1, "data.server.port=70000"),
    "negative keep_last": (["--checkpoint.keep_last=-1"], 1, "keep_last"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_config_is_one_line_naming_the_key_before_anything_loads(case: str, monkeypatch, capsys, tmp_path: Path) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a model, tokenizer or server was loaded for a config that is invalid")

    for target in ("grpo_lightning.module.load_policy", "grpo_lightning.data.load_tokenizer",
                   "grpo_lightning.inference.launch.ManagedServer.start"):
        monkeypatch.setattr(target, forbidden)
    args, code, key = CONFIG_ERRORS[case]
    assert main(["fit", "--config", CONFIG, *BASE, *logger(tmp_path, "bad"), *args]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = error_lines(err)
    assert key in line


def test_debug_env_keeps_the_traceback(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRPO_LIGHTNING_DEBUG", "1")
    with pytest.raises(ValueError, match="model.lr"):
        main(["fit", "--config", CONFIG, *logger(tmp_path, "dbg"), "--model.lr=-1"])


_env = SATEnv()
_env.reset(1003)
_scorer = RolloutGenerator(StubClient(""), None, lambda: SATEnv(), SamplingParams(max_tokens=1))
_lo, _hi = _env.reward_bounds


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.binary(max_size=512).map(lambda b: b.decode("utf-8", errors="surrogateescape")),
        st.lists(st.sampled_from([OPEN_TAG, CLOSE_TAG, "0", "1", " ", "\n", "\x00", "\ufeff", "１", "<|im_end|>"])).map("".join),
        st.integers(0, 300_000).map(lambda k: OPEN_TAG + "1" * k + CLOSE_TAG),
        st.integers(1, 5_000).map(lambda k: (OPEN_TAG + "1 0 " + CLOSE_TAG) * k),
    ),
    st.lists(st.integers(0, 400), max_size=64),
)
def test_any_completion_scores_through_the_rollout_path(text: str, token_ids: list[int]) -> None:
    completion = Completion([1, 2], token_ids, [-1.0] * len(token_ids), "length", text)
    [rollout] = _scorer.score(1003, [completion])
    assert math.isfinite(rollout.reward) and _lo - 1e-9 <= rollout.reward <= _hi + 1e-9
    assert rollout.completion_ids == token_ids and rollout.success == (rollout.components["correctness"] == 1.0)
    assert rollout.reward == pytest.approx(sum(rollout.components.values()))


def test_server_limits_and_api_key_reach_a_launched_server(server: ManagedServer) -> None:
    url, auth = server.urls[0], {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(f"{url}/v1/completions", json={"prompt": [1], "max_tokens": 1}).status_code == 401
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [1], "max_tokens": 1, "n": 9}, headers=auth)
    assert r.status_code == 400 and "n must be in [1, 8]" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [1] * 200_000, "max_tokens": 1}, headers=auth)
    assert r.status_code == 413 and "262144" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", json={"prompt": [1], "max_tokens": 1}, headers=auth).status_code == 200


def test_load_256_concurrent_requests_from_another_process(server: ManagedServer) -> None:
    spec = importlib.util.spec_from_file_location("load_server", ROOT / "benchmarks" / "load_server.py")
    load_server = importlib.util.module_from_spec(spec)
    sys.modules["load_server"] = load_server  # its dataclasses resolve their annotations there
    spec.loader.exec_module(load_server)
    result = load_server.run_load(server.urls[0], requests=256, max_tokens=16, api_key=API_KEY)
    print("\n" + load_server.format_table(result))
    assert result.errors == [] and len(result.latencies) == 256
    ordered = sorted(result.latencies)  # the table's nearest-rank percentiles, recomputed
    assert result.percentile(50) == ordered[127] > 0 and result.percentile(99) == ordered[253]


# ---------------------------------------------------------------------- 5. security defaults


def test_servers_bind_loopback_and_nothing_runs_remote_code_by_default(server: ManagedServer) -> None:
    assert ServerConfig().host == "127.0.0.1"
    assert build_parser().parse_args(["--model", "m"]).host == "127.0.0.1"
    assert GRPOModule().hparams.trust_remote_code is False
    assert RolloutDataModule().trust_remote_code is False
    # The launched server listens on 127.0.0.1 only (/proc/net/tcp: local address, state 0A = LISTEN).
    port = f"{server.port:04X}"
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[1].endswith(f":{port}") and line.split()[3] == "0A"]
    assert listening == [f"0100007F:{port}"]


def test_a_key_the_launched_server_inherits_is_sent_too(monkeypatch) -> None:
    monkeypatch.setenv("GRPO_LIGHTNING_API_KEY", "from-env")
    server = ManagedServer(ServerConfig(), model="tiny-sat")
    assert server.config.api_key == "from-env" and server.client().headers == {"Authorization": "Bearer from-env"}
    assert ManagedServer(ServerConfig(api_key="given"), model="tiny-sat").config.api_key == "given"
    assert ManagedServer(ServerConfig(urls=["http://127.0.0.1:9"])).config.api_key is None  # not ours: not its key


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['EXPLOIT_MARKER'])}",))


def test_checkpoints_load_without_running_code(tmp_path: Path, monkeypatch) -> None:
    assert isinstance(GRPOTrainer(accelerator="cpu", logger=False).strategy.checkpoint_io, AtomicCheckpointIO)
    io = AtomicCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, good)
    assert io.load_checkpoint(good)["epoch"] == 3
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    evil = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "payload": Exploit()}, evil)
    with pytest.raises(ValueError, match=r"refusing to load .*last.ckpt: it is not a plain tensor checkpoint"):
        io.load_checkpoint(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the control: unpickled the old way, the payload runs
    assert marker.exists()
    # Policies load from safetensors only: a folder of pickled weights is refused, not unpickled.
    pickled = tmp_path / "pickled"
    shutil.copytree(resolve_model_path("tiny-sat"), pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(OSError):
        load_policy(str(pickled))


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)
    before = digest(path)

    def half_then_die(self, checkpoint, target, storage_options=None):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io.TorchCheckpointIO.save_checkpoint", half_then_die)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"epoch": 2}, path)
    assert digest(path) == before and io.load_checkpoint(path)["epoch"] == 1
    monkeypatch.undo()
    io.save_checkpoint({"epoch": 2}, path)  # the orphan .tmp is simply overwritten
    assert io.load_checkpoint(path)["epoch"] == 2

