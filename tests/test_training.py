"""End-to-end `fit` runs on the CPU default: run directory, TensorBoard, determinism, resume, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_same_iteration, load
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from grpo_lightning.cli import main
from grpo_lightning.envs.sat import SATEnv
from grpo_lightning.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "sat_tiny.yaml")
TINY = [
    "--data.problems_per_iteration", "4",
    "--data.rollouts_per_problem", "4",
    "--data.eval.num_problems", "6",
    "--data.eval.replicates", "2",
    "--data.eval.interval", "2",
    "--data.max_tokens", "24",
    "--model.micro_batch_size", "8",
    # The mechanics under test, not the demo's recipe: two passes of one optimizer step each,
    # every problem of the iteration rule trained (dynamic sampling has its own test).
    "--model.num_iterations", "2",
    "--model.steps_per_iteration", "1",
    "--data.dynamic_sampling", "false",
    "--model.lr", "1e-3", "--model.warmup_steps", "5", "--model.lr_schedule", "constant",
]

# One pass per iteration, so each iteration's metrics come from the weights before its update.
REF_EXTRA = ["--model.kl_coef", "0.01", "--model.tis_cap", "2.0", "--model.num_iterations", "1"]

pytestmark = pytest.mark.slow


def fit(save_dir: Path, name: str, *extra: str) -> Path:
    assert main(["fit", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(save_dir),
                 "--trainer.logger.init_args.name", name, *TINY, *extra]) == 0
    versions = sorted((save_dir / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """Three uninterrupted iterations with a KL term and TIS on (so the reference model and the
    old-policy logprobs are exercised)."""
    out = tmp_path_factory.mktemp("runs")
    return fit(out, "ref", "--trainer.max_epochs", "3", *REF_EXTRA, "--data.num_samples_logged", "3",
               "--trainer.callbacks+=host_reads.HostReads")


def test_run_directory(reference_run: Path) -> None:
    run = reference_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["kl_coef"] == 0.01
    assert config["data"]["rollouts_per_problem"] == 4
    assert "temperature" not in config["model"]  # linked from data.temperature, not repeated
    assert (run / "server.log").stat().st_size > 0

    lo, hi = SATEnv().reward_bounds
    for i in range(3):
        m = load(run / "metrics" / f"train_iter_{i:03d}.json")
        assert m["iteration"] == i
        assert lo <= m["reward/reward_mean"] <= hi
        assert 0 <= m["reward/success_rate"] <= 1
        comps = sum(v for k, v in m.items() if k.startswith("reward_component/"))
        assert comps == pytest.approx(m["reward/reward_mean"], abs=1e-9)
        assert m["train/kl/mean"] >= 0
        assert m["train/optimizer_steps"] == config["model"]["num_iterations"] * config["model"]["steps_per_iteration"]
        assert m["time/generate_s"] > 0 and m["time/train_s"] > 0 and m["time/sync_s"] > 0
        assert m["sync/verified"] is True
        assert m["sync/weight_version"] is None  # the built-in server labels no version: its checksum verifies
        assert len(m["problem_seeds"]) == 4
    first = load(run / "metrics" / "train_iter_000.json")
    assert first["train/kl/mean"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert first["train/ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["train/mismatch/abs_max"] < 1e-4  # the server's logprobs are the trainer's
    # Evaluations: baseline, after iteration 1 (interval 2) and after the last one.
    assert {p.name for p in (run / "metrics").glob("eval_*.json")} == {
        "eval_baseline.json", "eval_iter_001.json", "eval_iter_002.json"}
    ev = load(run / "metrics" / "eval_iter_002.json")
    assert ev["num_completions"] == 12 and 0 <= ev["pass@2"] <= 1 and ev["best@2"] >= ev["mean@2"]

    # HF checkpoint (interval 10 -> only the last) equals the Lightning checkpoint's policy.
    hf = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "iter_002")
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(k.startswith("policy.") for k in state), "only the policy is checkpointed (no reference model)"
    # The last iteration's HF checkpoint is the folder just synced to the server, linked, not written twice.
    synced, saved = run / "sync_weights" / "model.safetensors", run / "checkpoints" / "iter_002" / "model.safetensors"
    assert synced.stat().st_ino == saved.stat().st_ino
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, state[f"policy.{name}"]), name


def test_tensorboard_events(reference_run: Path) -> None:
    acc = EventAccumulator(str(reference_run), size_guidance={"tensors": 0, "scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("reward/reward_mean", "reward/success_rate", "train/loss", "train/loss/policy",
                "train/grad_norm", "eval/success_rate", "eval/reward_mean", "time/generate_s"):
        assert tag in tags["scalars"], tag
    steps = [e.step for e in acc.Scalars("eval/success_rate")]
    assert steps == [0, 2, 3]
    train = load(reference_run / "metrics" / "train_iter_001.json")
    logged = {e.step: e.value for e in acc.Scalars("reward/reward_mean")}
    assert logged[1] == pytest.approx(train["reward/reward_mean"], rel=1e-6)
    first = acc.Tensors("train/samples/text_summary")[0]
    lines = first.tensor_proto.string_val[0].decode().splitlines()
    assert first.step == 0 and lines[0] == "| problem | reward | success | completion |"
    samples = [line.split(" | ")[:3] for line in lines[2:]]
    assert len(samples) == 3  # data.num_samples_logged
    iteration_0 = load(reference_run / "metrics" / "train_iter_000.json")
    assert all(int(seed.strip("| ")) in iteration_0["problem_seeds"] for seed, _, _ in samples)
    assert all(0 <= float(reward) <= 1 and success in ("True", "False") for _, reward, success in samples)
    assert "train/rewards" in tags["histograms"] and "eval/rewards" in tags["histograms"]


def test_training_reads_back_from_the_device_once_per_optimizer_step(reference_run: Path) -> None:
    """On a GPU every value read back to the host stalls the CPU until the GPU catches up. Our
    training step keeps its statistics and non-finite flags on the device: a micro-batch reads
    nothing back, an optimizer step one pair (grad norm, non-finite flag) to decide the step."""
    rows = load(reference_run / "host_reads.json")
    assert len(rows) == 3 * 2  # 3 iterations x 2 micro-batches of 8
    assert [r["reads"] for r in rows if not r["step_end"]] == [{}] * 3
    ends = [r["reads"] for r in rows if r["step_end"]]
    assert len(ends) == 3 and all(sum(e.values()) == 1 and next(iter(e)).startswith("tolist at module.py") for e in ends)


def test_same_seed_is_deterministic_and_resume_matches(reference_run: Path, tmp_path: Path) -> None:
    """Stop after two iterations, resume with --ckpt_path last: every metric of every iteration
    equals the uninterrupted run's (timings aside; training statistics to float noise, see
    assert_same_iteration), so rollouts and updates are identical."""
    first = fit(tmp_path, "resumed", "--trainer.max_epochs", "2", *REF_EXTRA)
    assert not (first / "metrics" / "train_iter_002.json").exists()
    again = fit(tmp_path, "resumed", "--trainer.max_epochs", "3", "--ckpt_path", "last", *REF_EXTRA)
    assert again == first, "resume continues in the same run directory"
    for i in range(3):
        name = f"train_iter_{i:03d}.json"
        assert_same_iteration(load(reference_run / "metrics" / name), load(again / "metrics" / name), name)
    assert load(again / "metrics" / "train_iter_002.json")["sync/reason"] == "iteration"
    for name in ("eval_baseline.json", "eval_iter_001.json", "eval_iter_002.json"):
        assert_same_iteration(load(reference_run / "metrics" / name), load(again / "metrics" / name), name)


def test_other_seed_gives_other_rollouts(reference_run: Path, tmp_path: Path) -> None:
    other = fit(tmp_path, "seed1", "--trainer.max_epochs", "1", "--seed_everything", "1",
                "--data.eval.baseline", "false")
    a = load(reference_run / "metrics" / "train_iter_000.json")
    b = load(other / "metrics" / "train_iter_000.json")
    assert a["problem_seeds"] == b["problem_seeds"]  # the problems follow the iteration rule
    assert a["rollout/completion_tokens_mean"] != b["rollout/completion_tokens_mean"] or a["reward/reward_mean"] != b["reward/reward_mean"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--trainer.logger.init_args.name", "empty", "--ckpt_path", "last"]) == 1
    assert "nothing to resume" in capsys.readouterr().err


def test_ddp_two_cpu_ranks_keep_identical_weights(tmp_path: Path) -> None:
    """Two ranks train one iteration: their weights stay identical and equal a single-process
    run on the same rollouts (the loss normalisation accounts for the ranks). Two passes of two
    steps with a KL term: each pass deals rollouts to the ranks afresh, so a rank needs reference
    log-probabilities for rollouts it did not see in the first pass."""
    common = ["--trainer.max_epochs", "1", "--data.eval.num_problems", "0", "--model.kl_coef", "0.05",
              "--model.num_iterations", "2", "--model.steps_per_iteration", "2"]
    single = fit(tmp_path, "single", *common)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "grpo_lightning", "fit", "--config", CONFIG, *TINY, *common,
           "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "ddp",
           "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.accelerator", "cpu", "--trainer.callbacks+=ddp_probe.WeightDigest"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp" / "version_0"
    d0 = (run / "digest_rank0.txt").read_text()
    d1 = (run / "digest_rank1.txt").read_text()
    assert d0 == d1
    for rank in (0, 1):
        missing, _, total = (run / f"missing_ref_rank{rank}.txt").read_text().split()
        assert missing == "0" and int(total) > 0, rank  # every rank trains, on precomputed references
    m = load(run / "metrics" / "train_iter_000.json")
    ref = load(single / "metrics" / "train_iter_000.json")
    assert m["problem_seeds"] == ref["problem_seeds"]
    assert m["reward/reward_mean"] == ref["reward/reward_mean"]
    assert m["train/tokens"] == ref["train/tokens"]
    assert m["train/optimizer_steps"] == ref["train/optimizer_steps"] >= 1
    # The logged loss is the objective of the rank-averaged gradient, as one process logs it.
    for key in ("train/loss", "train/loss/policy", "train/loss/kl"):
        assert m[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-6), key
    ddp_w = load_file(run / "checkpoints" / "iter_000" / "model.safetensors")
    one_w = load_file(single / "checkpoints" / "iter_000" / "model.safetensors")
    base = load_file(Path(resolve_model_path("tiny-sat")) / "model.safetensors")
    assert max((ddp_w[k] - base[k]).abs().max().item() for k in base) > 1e-4  # it trained
    assert max((ddp_w[k] - one_w[k]).abs().max().item() for k in one_w) < 1e-5


def test_plot_draws_the_metrics_files(reference_run: Path, tmp_path: Path) -> None:
    from grpo_lightning.plot import load_curves

    curves = load_curves(reference_run)
    evals = [load(p) for p in sorted((reference_run / "metrics").glob("eval_*.json"))]
    assert curves["eval/success_rate"] == sorted((e["step"], e["success_rate"]) for e in evals)
    assert [s for s, _ in curves["eval/success_rate"]] == [0, 2, 3]  # baseline, after iterations 1 and 2
    assert curves["train/reward_mean"] == [
        (i, load(reference_run / "metrics" / f"train_iter_{i:03d}.json")["reward/reward_mean"]) for i in range(3)
    ]
    out = tmp_path / "curve.png"
    assert main(["plot", str(reference_run), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path), "-o", str(out)]) != 0  # not a run directory: an error, not a crash
    # validate writes eval_validate.json (no step) into the run directory: not a point on the curve.
    (reference_run / "metrics" / "eval_validate.json").write_text('{"success_rate": 0.5, "reward_mean": 0.1}')
    try:
        assert load_curves(reference_run)["eval/success_rate"] == curves["eval/success_rate"]
    finally:
        (reference_run / "metrics" / "eval_validate.json").unlink()


def test_dynamic_sampling_that_finds_no_signal_keeps_the_run_going(tmp_path: Path) -> None:
    """One-token completions all score the minimum: no group ever has signal. The iteration
    trains on its own groups (advantages 0) instead of Lightning ending the fit silently."""
    run = fit(tmp_path, "flat", "--trainer.max_epochs", "2", "--data.max_tokens", "1",
              "--data.dynamic_sampling", "true", "--data.dynamic_sampling_max_rounds", "2",
              "--data.eval.num_problems", "0")
    env = SATEnv(max_difficulty=0.34)
    seeds = [s for s in range(0, 200) if env.accepts(s)]
    for i in range(2):
        m = load(run / "metrics" / f"train_iter_{i:03d}.json")
        assert m["rollout/dynamic_sampling_rounds"] == 2 and m["rollout/frac_reward_zero_std"] == 1.0
        assert m["rollout/groups_trained"] == 4 and m["problem_seeds"] == seeds[4 * i : 4 * i + 4]  # the iteration's own
        assert m["train/loss/policy"] == 0.0 and m["train/optimizer_steps"] >= 1
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_validate_a_checkpoint_reproduces_the_runs_last_eval(reference_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``validate --ckpt_path`` serves the checkpoint's weights: the same eval set and sampling
    seeds give the numbers the run logged after its last iteration."""
    assert main(["validate", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--trainer.logger.init_args.name", "val", *TINY, *REF_EXTRA,
                 "--ckpt_path", str(reference_run / "checkpoints" / "last.ckpt")]) == 0
    got = load(tmp_path / "val" / "version_0" / "metrics" / "eval_validate.json")
    want = load(reference_run / "metrics" / "eval_iter_002.json")
    for key in ("success_rate", "reward_mean", "pass@2", "num_completions"):
        assert got[key] == want[key], key
    assert main(["validate", "--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path),
                 *TINY, "--ckpt_path", str(reference_run / "metrics" / "eval_iter_002.json")]) == 1  # not a checkpoint
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: refusing to load the --ckpt_path checkpoint: it is not a plain tensor checkpoint (")
