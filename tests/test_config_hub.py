"""Every file in configs/ parses, validates and instantiates (litgpt's config-hub test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from grpo_lightning.cli import build_cli
from grpo_lightning.data import RolloutDataModule
from grpo_lightning.module import GRPOModule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"sat_tiny.yaml", "qwen2.5-1.5b_vllm.yaml", "qwen2.5-1.5b_sglang.yaml", "sat_tiny_lora.yaml",
            "qwen2.5-7b_lora_vllm_1gpu.yaml", "qwen2.5-7b_lora_sglang_1gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(path: Path, tmp_path: Path) -> None:
    # GPU configs are checked on this CPU machine: only the trainer's device is overridden.
    cli = build_cli(
        ["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        run=False,
    )
    assert isinstance(cli.model, GRPOModule) and cli.model.policy is None  # nothing loaded yet
    assert isinstance(cli.datamodule, RolloutDataModule) and cli.datamodule.service is None
    config = cli.config
    # Linked values arrive where they are used.
    assert cli.datamodule.model_name_or_path == config.model.model_name_or_path
    assert cli.model.hparams.temperature == config.data.temperature
    assert cli.model.hparams.max_completion_length == config.data.max_tokens
    assert cli.datamodule.seed == config.seed_everything
    assert cli.trainer.reload_dataloaders_every_n_epochs == 1
    # The server is launched for the adapters the trainer will send.
    assert cli.datamodule.lora == cli.model.lora and cli.model.lora.enabled == ("lora" in path.name)
    if "qwen" in path.name:
        assert config.data.server.backend in ("vllm", "sglang")
        raw = yaml.safe_load(path.read_text())
        if "8gpu" in path.name:
            # The server's GPUs and the sharded trainer's are disjoint and cover the node.
            strategy = raw["trainer"]["strategy"]
            assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
            devices = raw["trainer"]["devices"]
            assert strategy["init_args"] == {"data_parallel_size": len(devices), "tensor_parallel_size": 1}
            assert sorted(devices + config.data.server.gpu) == list(range(8))
            assert len(config.data.server.gpu) % config.data.server.tensor_parallel_size == 0
        else:
            assert config.data.server.gpu == 0
            assert raw["trainer"]["devices"] == ([0] if "1gpu" in path.name else [1])


def test_print_config_is_complete_and_documented(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--config", str(CONFIGS[0]), "--print_config=comments"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("lr:", "loss_type:", "rollouts_per_problem:", "scale_rewards:", "backend:", "interval:"):
        assert key in out
    # Hyperparameters carry their docstrings (what they do, and the paper).
    assert "GSPO" in out and "Dr. GRPO" in out and "DAPO" in out


def test_help_lists_subcommands(capsys) -> None:
    with pytest.raises(SystemExit):
        build_cli(["--help"])
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "serve", "sweep"):
        assert sub in out
