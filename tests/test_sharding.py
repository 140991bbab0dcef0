"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes (gloo):
the same training as one unsharded process, the HF export of the sharded policy, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_iteration, load
from lightning.pytorch import Trainer
from safetensors.torch import load_file
from sharding_probe import PROBES
from test_training import CONFIG, ROOT, TINY, fit
from transformers import AutoModelForCausalLM

from grpo_lightning.cli import checkpoint_state_dict
from grpo_lightning.inference.weights import checkpoint_keys, folder_checksum
from grpo_lightning.models import load_policy, resolve_model_path
from grpo_lightning.module import GRPOModule
from grpo_lightning.sharding import save_pretrained_sharded, sharding_units

# A KL term (the reference model is sharded too), TIS with two passes (old-policy
# log-probabilities from the sharded policy in eval mode), two optimizer steps of two
# micro-batches per rank: accumulation across micro-batches under sharding.
COMMON = ["--data.eval.num_problems", "0", "--model.kl_coef", "0.05", "--model.tis_cap", "2.0",
          "--model.num_iterations", "2", "--model.steps_per_iteration", "2", "--model.micro_batch_size", "2"]
SHARDED = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
           "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
           "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def fit_sharded(save_dir: Path, *extra: str) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "grpo_lightning", "fit", "--config", CONFIG, *TINY, *COMMON, *SHARDED,
           "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", "sharded",
           "--trainer.callbacks+=sharding_probe.GatheredWeights", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save_dir / "sharded" / "version_0"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three runs (two of them two processes plus a server): above the default on a busy machine
def test_two_sharded_cpu_ranks_train_as_one_process_and_resume_exactly(tmp_path: Path) -> None:
    """Two iterations unsharded in one process against the same two iterations sharded over two
    ranks, stopped after the first and resumed from last.ckpt (a distributed checkpoint with
    the sharded AdamW state): same rollouts, same statistics, the same weights on both ranks
    and equal to the unsharded run's."""
    single = fit(tmp_path, "single", "--trainer.max_epochs", "2", *COMMON)
    run = fit_sharded(tmp_path, "--trainer.max_epochs", "1")
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert fit_sharded(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last") == run

    for i in range(2):
        name = f"train_iter_{i:03d}.json"
        got, want = load(run / "metrics" / name), load(single / "metrics" / name)
        # The logged loss is the objective the rank-averaged gradient follows: the single process's.
        assert_same_iteration(got, want, name)
        assert got["sync/verified"] is True and got["train/optimizer_steps"] == 4
    assert load(run / "metrics" / "train_iter_001.json")["sync/reason"] == "iteration"

    one = load_file(single / "checkpoints" / "iter_001" / "model.safetensors")
    base = load_file(Path(resolve_model_path("tiny-sat")) / "model.safetensors")
    ranks = [load_file(run / f"gathered_rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == one.keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in one)
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-3  # it trained
    assert max((ranks[0][k] - one[k]).abs().max().item() for k in one) < 1e-5

    # The folder written from the shards is an ordinary HF folder: the server loaded it (the
    # sync above was verified by its weights checksum), transformers loads it, and the last
    # iteration's checkpoint is the synced folder linked.
    synced = run / "sync_weights"
    assert folder_checksum(synced) == folder_checksum(run / "checkpoints" / "iter_001")
    assert (synced / "model.safetensors").stat().st_ino == (run / "checkpoints" / "iter_001" / "model.safetensors").stat().st_ino
    hf = AutoModelForCausalLM.from_pretrained(synced)
    state = hf.state_dict()
    assert all(torch.equal(state[k], ranks[0][k]) for k in one)

    # validate --ckpt_path reads the distributed checkpoint in one process.
    module = GRPOModule()
    module.configure_model(reference=False)
    module.load_state_dict(checkpoint_state_dict(str(ckpt), module, Trainer(accelerator="cpu", logger=False)))
    restored = module.policy.state_dict()
    assert all(torch.equal(restored[k], ranks[0][k]) for k in one)

    # The probe that verifies vLLM/SGLang syncs, run as a collective of the sharded policy.
    probes = load(run / "probe.json")
    module = GRPOModule(model_name_or_path=str(synced))
    module.configure_model()
    for (prompt, completion), values in zip(PROBES, probes, strict=True):
        assert values == pytest.approx(module.probe_logprobs(prompt, completion), abs=1e-5)


def test_hf_export_streams_shards_with_an_index(tmp_path: Path, tiny_sat_path: str) -> None:
    """Past ``max_shard_bytes`` the export writes numbered shards and the index that
    transformers, vLLM and SGLang read; tied weights are stored once, as save_pretrained does."""
    model = load_policy(tiny_sat_path)
    save_pretrained_sharded(model, tmp_path / "out", write=True, max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert checkpoint_keys(tmp_path / "out") == checkpoint_keys(tiny_sat_path)  # lm_head.weight not stored
    assert folder_checksum(tmp_path / "out") == folder_checksum(tiny_sat_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_sharding_units_are_the_decoder_layers(tiny_model) -> None:
    units = sharding_units(tiny_model)
    assert [type(u).__name__ for u in units] == ["Qwen2DecoderLayer"] * tiny_model.config.num_hidden_layers


class _Mesh:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def __getitem__(self, name: str) -> _Mesh:
        return _Mesh({"": self.sizes[name]})

    def size(self) -> int:
        return self.sizes[""]


def test_tensor_parallel_size_above_one_is_refused_before_the_model_loads() -> None:
    module = GRPOModule(model_name_or_path="/nonexistent/model")
    module._device_mesh = _Mesh({"tensor_parallel": 2, "data_parallel": 1})
    with pytest.raises(ValueError) as err:
        module.configure_model()
    assert str(err.value).startswith("trainer.strategy.init_args.tensor_parallel_size=2: ")
    assert "data_parallel_size 2" in str(err.value)


def test_initialised_optimizer_state_trains_as_a_fresh_optimizer() -> None:
    """Distributed checkpointing would step an empty AdamW once (lr 0) at the first save;
    the state made in advance, with step counts at 0, must train exactly as a fresh one."""
    from grpo_lightning.sharding import initialise_optimizer_state

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.1) for m in (a, b)]
    initialise_optimizer_state(opts[1])
    assert all(float(s["step"]) == 0 for s in opts[1].state.values())
    x = torch.randn(5, 4)
    for model, opt in zip((a, b), opts, strict=True):
        for _ in range(3):
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
