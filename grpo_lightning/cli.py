"""The command line: LightningCLI ``fit``/``validate`` plus ``serve``, ``sweep`` and ``plot``.

    python -m grpo_lightning fit --config configs/sat_tiny.yaml [--model.lr 1e-5 ...]
    python -m grpo_lightning fit --config configs/sat_tiny.yaml --ckpt_path last   # resume
    python -m grpo_lightning validate --config configs/sat_tiny.yaml --ckpt_path last
    python -m grpo_lightning serve --model tiny-sat --port 8000
    python -m grpo_lightning sweep --config configs/sat_tiny.yaml --grid model.lr=1e-3,3e-3
    python -m grpo_lightning plot lightning_logs/sat_tiny/version_0 -o curve.png
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callbacks import (
    AtomicCheckpointIO,
    EvaluationCallback,
    HFCheckpointCallback,
    IterationCheckpoint,
    MetricsFileCallback,
    WeightSyncCallback,
    refused_checkpoint,
    run_dir,
    save_hf_atomic,
)
from .commands import EXTRA_SUBCOMMANDS, run_extra
from .data import RolloutDataModule
from .inference.client import GenerationError, ServerUnavailable
from .inference.weight_sync import WeightSyncError
from .lora import check_strategy
from .module import GRPOModule, NonFiniteError
from .runfiles import write_json_atomic

# Failures we name ourselves: the message says what happened, a traceback would bury it.
# GRPO_LIGHTNING_DEBUG=1 lets them propagate with their traceback.
KNOWN_ERRORS = (ServerUnavailable, GenerationError, WeightSyncError, NonFiniteError, ValueError)
DEBUG_ENV = "GRPO_LIGHTNING_DEBUG"

DESCRIPTION = (
    "grpo-lightning: offline GRPO training on verifiable tasks.\n\nsubcommands: fit (train), "
    "validate (evaluate a policy on the eval set), "
    + ", ".join(f"{name} ({text})" for name, (_, text) in EXTRA_SUBCOMMANDS.items())
    + ".\nRun `python -m grpo_lightning SUBCOMMAND --help` for each one's options."
)


class GRPOTrainer(Trainer):
    """Lightning's Trainer with ``precision="auto"`` (bf16-mixed on CUDA with bf16, else
    32-true), checkpoints written atomically (temporary name, then rename) and ``cpu_threads``.
    """

    def __init__(
        self,
        *args: Any,
        precision: Any = "auto",
        plugins: Any = None,
        cpu_threads: int | None = None,
        tf32: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            precision: Lightning's precision, or ``auto``: bf16-mixed (fp32 master weights,
                bf16 autocast) on a CUDA device with bf16 support, 32-true elsewhere.
            tf32: fp32 matrix products on CUDA use TF32 tensor cores (inputs rounded to a
                10-bit mantissa, fp32 accumulation). Under bf16-mixed the only fp32 products
                left are the log-probability head's (its logits stay fp32, about 8x more
                precise than bf16 logits); on an H200 with a Qwen2.5-1.5B-shaped model that
                head took half of a training step in true fp32. False keeps true fp32 (slower,
                bit-for-bit the CPU's arithmetic). No effect on the CPU.
            cpu_threads: torch threads of the training process; None keeps torch's default
                (one per core). On a small or shared CPU machine 1 is much faster for small
                models: OpenMP workers spin while the inference server or another process
                holds the cores (measured: 1.7 s instead of 16 s per iteration of the demo).
        """
        if cpu_threads is not None:
            if cpu_threads < 1:
                raise ValueError(f"trainer.cpu_threads must be at least 1, got {cpu_threads}")
            torch.set_num_threads(cpu_threads)
        # A process-wide switch, like Lightning's own advice to set the matmul precision.
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if precision == "auto":
            precision = auto_precision(kwargs.get("accelerator", "auto"))
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else ([plugins] if plugins else [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        super().__init__(*args, precision=precision, plugins=plugins, **kwargs)


def auto_precision(accelerator: Any) -> str:
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"  # fp32 master weights, bf16 autocast
    return "32-true"


class GRPOCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}, "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HFCheckpointCallback, "checkpoint")
        parser.add_lightning_class_args(WeightSyncCallback, "weight_sync")
        # One source of truth for values both halves need.
        for key in ("model_name_or_path", "trust_remote_code", "num_iterations", "steps_per_iteration",
                    "micro_batch_size", "max_tokens_per_micro_batch", "share_prompts",
                    "lora.enabled", "lora.rank", "lora.alpha", "lora.dropout", "lora.target_modules"):
            parser.link_arguments(f"model.{key}", f"data.{key}")
        parser.link_arguments("data.temperature", "model.temperature")
        parser.link_arguments("data.max_tokens", "model.max_completion_length")
        parser.link_arguments("data.max_staleness", "model.max_staleness")
        parser.link_arguments("seed_everything", "data.seed")

    def before_instantiate_classes(self) -> None:
        if self.subcommand in ("fit", "validate"):
            config = self.config[self.subcommand]
            check_strategy(bool(config.get("model.lora.enabled")), config.get("trainer.strategy"))
            resolve_last_checkpoint(config)
            no_hp_metric(config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        extra = {key: self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys}
        steps = iteration_callbacks(extra.pop("weight_sync"), extra.pop("checkpoint"))
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, [*extra.values(), *steps])

    def validate(self, model: GRPOModule, datamodule: RolloutDataModule, ckpt_path: str | None = None, **_: Any) -> None:
        """Evaluate a policy (the config's model, or ``--ckpt_path``) on the eval set."""
        trainer = self.trainer
        if ckpt_path:  # otherwise the server loads the config's model itself: nothing to load here
            model.configure_model(reference=False)
            model.load_state_dict(checkpoint_state_dict(ckpt_path, model, trainer), strict=model.strict_loading)
        datamodule.trainer = trainer
        datamodule.setup("validate")
        service = datamodule.service
        assert service is not None
        try:
            if ckpt_path:
                folder = save_hf_atomic(model, run_dir(trainer) / "sync_weights")
                service.sync(folder, reason="validate", probe=model.probe_logprobs)
            metrics, _ = service.evaluate()
            write_json_atomic(run_dir(trainer) / "metrics" / "eval_validate.json", {"ckpt_path": ckpt_path, **metrics})
            width = max(map(len, metrics))
            print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()))
        finally:
            datamodule.teardown("validate")


def checkpoint_state_dict(path: str, model: GRPOModule, trainer: Trainer) -> dict[str, Any]:
    """The weights of a checkpoint: a file, or the folder a sharding strategy writes (a
    distributed checkpoint, read here in one process into ``model``'s unsharded layout)."""
    if not Path(path).is_dir():
        return trainer.strategy.checkpoint_io.load_checkpoint(path)["state_dict"]
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": model.state_dict()}
    dcp.load(state, checkpoint_id=path)
    return state["state_dict"]


def resolve_last_checkpoint(config: Namespace) -> None:
    """``--ckpt_path last`` resumes the newest run of the logger's name, in that run's folder."""
    if config.get("ckpt_path") != "last":
        return
    logger = config.trainer.logger
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if not isinstance(logger, Namespace) or "init_args" not in logger:
        raise ValueError("--ckpt_path last needs a TensorBoardLogger in trainer.logger to find the run folder")
    args = logger.init_args
    base = Path(args.save_dir) / (args.name or "")
    # A file, or a folder under a sharding strategy (a distributed checkpoint).
    runs = [p for p in base.glob("version_*") if (p / "checkpoints" / "last.ckpt").exists()]
    if not runs:
        raise ValueError(f"--ckpt_path last: no checkpoints/last.ckpt under {base}/version_*; nothing to resume")
    newest = max(runs, key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1)
    args.version = int(newest.name.split("_")[1])
    config.ckpt_path = str(newest / "checkpoints" / "last.ckpt")


def trainer_defaults() -> dict[str, Any]:
    """What every run needs; the config adds to the callbacks, never replaces these."""
    return {
        "reload_dataloaders_every_n_epochs": 1,  # fresh rollouts every epoch
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,  # ranks get their micro-batches from build_schedule
        "log_every_n_steps": 1,
        "enable_model_summary": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "lightning_logs", "name": "default"},
        },
    }


def iteration_callbacks(weight_sync: WeightSyncCallback, hf_checkpoint: HFCheckpointCallback) -> list[Callback]:
    """The steps that follow an iteration's training, in the order they run.

    Lightning calls the hooks of its callbacks in list order (checkpoint callbacks last, which
    ``IterationCheckpoint`` is anyway), so this list is the order of one iteration ``i``, after
    its rollouts were handed over by the data module and trained on:

    1. ``WeightSyncCallback``: the new weights (policy version ``i + 1``) go to the server;
       at fit start it also serves a resumed run's restored weights before anything else.
    2. ``EvaluationCallback``: the eval set on those weights (beside the generation ahead when
       ``data.max_staleness >= 1``); at fit start, the baseline.
    3. ``MetricsFileCallback``: ``metrics/train_iter_{i}.json`` and TensorBoard, from the
       iteration's record (rollouts, statistics, sync report).
    4. ``HFCheckpointCallback``: ``checkpoints/iter_{i}`` (hard links to the folder just synced).
    5. ``IterationCheckpoint``: ``checkpoints/last.ckpt``, last, so a run killed anywhere before
       it resumes from the previous iteration (also written once before the first iteration).
    """
    return [weight_sync, EvaluationCallback(), MetricsFileCallback(), hf_checkpoint, IterationCheckpoint()]


def no_hp_metric(config: Namespace) -> None:
    """TensorBoard's ``hp_metric`` is a placeholder Lightning logs (-1) when no metric is given
    with the hyperparameters; we log none, so it is turned off."""
    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    for logger in loggers:
        if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
            logger.init_args.default_hp_metric = False


def build_cli(args: list[str] | None, run: bool = True, **parser_kwargs: Any) -> GRPOCLI:
    """The LightningCLI of ``fit``/``validate``; ``run=False`` parses and instantiates only
    (no model loads, no server starts), which is how ``sweep`` validates its runs."""
    return GRPOCLI(
        GRPOModule,
        RolloutDataModule,
        trainer_class=GRPOTrainer,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"description": DESCRIPTION, "default_env": False, **parser_kwargs},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; returns the exit code: 0, 1 (a run failed) or 2 (bad command line or config).

    Known failures print one line, ``error: <what happened>``, on stderr.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    code = run_extra(args)
    if code is not None:
        return code
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        build_cli(None if argv is None else args, exit_on_error=False)
    except ArgumentError as exc:
        if debug:
            raise
        return _fail(f"{exc} (see --help)", code=2)
    except KNOWN_ERRORS as exc:
        if debug:
            raise
        return _fail(str(exc), code=1)
    except pickle.UnpicklingError as exc:
        # LightningCLI reads --ckpt_path's hyperparameters itself (weights_only), before our loader.
        if debug:
            raise
        return _fail(str(refused_checkpoint("the --ckpt_path checkpoint", exc)), code=1)
    return 0


def _fail(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code
