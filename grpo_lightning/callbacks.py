"""Callbacks of the GRPO loop: weight sync, evaluation, metrics files, HF checkpoints, last.ckpt.

Each is one concern; none reads another's state. What they share is the iteration's public
record (``RolloutDataModule.record``: rollouts and statistics, the sync report, the
evaluation), and the rollout service they ask for a sync or an evaluation. The order they run
in is written once, in ``cli.iteration_callbacks``.

TensorBoard steps count policy updates: rollouts and losses of iteration ``i`` come from the
policy after ``i`` iterations (step ``i``); the evaluation after iteration ``i`` is step
``i + 1``; the baseline evaluation is step 0.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from .data import RolloutDataModule
from .inference.service import IterationRecord, RolloutService
from .module import GRPOModule, NonFiniteError
from .rollouts import Rollout
from .runfiles import replace_durably, write_json_atomic
from .sharding import RankZeroCalls


def run_dir(trainer: pl.Trainer) -> Path:
    """``lightning_logs/<name>/version_N`` (the logger's folder).

    ``Trainer.log_dir`` is a collective under DDP (rank zero broadcasts it), so the data module
    resolves it once in ``setup`` on every rank and rank-zero-only code reads that copy.
    """
    dm = trainer.datamodule
    if isinstance(dm, RolloutDataModule) and dm.run_dir is not None:
        return dm.run_dir
    return Path(trainer.log_dir or trainer.default_root_dir)


def save_hf_atomic(module: GRPOModule, target: Path, same_as: Path | None = None) -> Path:
    """Save the policy as an HF folder under a temporary name, then swap it into ``target``.

    ``same_as``: a folder already holding exactly these weights (the one just synced to the
    server): its files are hard-linked instead of serialising and writing the model again.

    Collective when the policy is sharded (every rank gathers, rank 0 writes); otherwise rank
    zero calls it alone."""
    tmp = target.with_name(target.name + ".tmp")
    writer = module.global_rank == 0
    linked = False
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        linked = same_as is not None and _link_tree(same_as, tmp)
    if module.sharded:
        linked = module.trainer.strategy.broadcast(linked)
    if not linked:
        module.save_hf(tmp)
    if writer:
        swap_into(tmp, target)
    return target


def swap_into(tmp: Path, target: Path) -> None:
    """Replace ``target`` (a file or a folder) by ``tmp``; at every moment one of them is whole."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        _remove(old)
        os.replace(target, old)
    replace_durably(tmp, target)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _log_scalars(trainer: pl.Trainer, metrics: dict[str, Any], step: int) -> None:
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)


def _tensorboard(trainer: pl.Trainer) -> Any:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _samples_markdown(rollouts: list[Rollout], k: int) -> str:
    rows = ["| problem | reward | success | completion |", "|---|---|---|---|"]
    for r in rollouts[:k]:
        text = r.text.replace("|", "\\|").replace("\n", "⏎")[:300]
        rows.append(f"| {r.problem_seed} | {r.reward:.3f} | {r.success} | `{text}` |")
    return "\n".join(rows)


def _link_tree(source: Path, target: Path) -> bool:
    """Hard-link every file of ``source`` into ``target``; False (and nothing left) where the
    filesystem cannot."""
    try:
        for f in (f for f in source.rglob("*") if f.is_file()):
            (target / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target / f.relative_to(source))
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        return False
    return True


def _record(trainer: pl.Trainer) -> IterationRecord:
    """The current iteration's public record (see ``RolloutDataModule.record``)."""
    dm = trainer.datamodule
    assert isinstance(dm, RolloutDataModule)
    return dm.record(trainer.current_epoch)


def _service(trainer: pl.Trainer) -> RolloutService:
    """The rollout service (rank zero)."""
    dm = trainer.datamodule
    assert isinstance(dm, RolloutDataModule) and dm.service is not None
    return dm.service


class WeightSyncCallback(pl.Callback):
    """Pushes the policy to the inference server after each iteration, and after a resume."""

    def __init__(self, verify: bool = True) -> None:
        """
        Args:
            verify: check after every sync that the server serves the new weights (checksum on
                the built-in server, a log-probability probe elsewhere) and fail otherwise.
        """
        self.verify = verify

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A launched server starts with the original weights; a resumed run must serve the
        # restored ones before its first rollout, and an attached server may serve anything.
        dm = trainer.datamodule
        attached = isinstance(dm, RolloutDataModule) and dm.server_config.urls
        if trainer.ckpt_path or attached:
            self.sync(trainer, pl_module, reason="resume" if trainer.ckpt_path else "attach")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The weights after iteration i are policy version i + 1.
        self.sync(trainer, pl_module, reason="iteration", version=trainer.current_epoch + 1)

    def sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str, version: int | None = None) -> None:
        assert isinstance(pl_module, GRPOModule)
        dm = trainer.datamodule
        assert isinstance(dm, RolloutDataModule)
        record = dm.record(trainer.current_epoch) if reason == "iteration" else IterationRecord(-1)
        # The built-in server's checksum already proves which weights it serves; the
        # log-probability probe (a generation plus a forward pass) is for vLLM and SGLang.
        probe = pl_module.probe_logprobs if self.verify and dm.server_config.backend != "builtin" else None
        if trainer.is_global_zero:
            # Requests generating ahead on the weights now in the sync folder (a server that fails
            # meanwhile restarts on that folder) finish before the folder is overwritten.
            _service(trainer).drain(version)
        if pl_module.sharded or trainer.is_global_zero:
            # Sharded, gathering the weights is a collective: every rank joins (rank 0 writes).
            t0 = time.perf_counter()
            folder = save_hf_atomic(pl_module, run_dir(trainer) / "sync_weights")
            record.synced = (folder, trainer.global_step)
        if pl_module.sharded and probe is not None:
            # The probe's forward pass is a collective too: the other ranks serve rank 0's calls.
            probe = RankZeroCalls(probe, trainer.strategy.broadcast)
            if not trainer.is_global_zero:
                probe.serve()
        if trainer.is_global_zero:
            save_s = time.perf_counter() - t0
            try:
                report = _service(trainer).sync(folder, reason=reason, version=version, probe=probe)
            finally:
                if isinstance(probe, RankZeroCalls):
                    probe.close()
            record.sync = {
                "time/sync_s": save_s + report.seconds + report.verify_seconds,
                "time/sync_save_s": save_s,
                "time/sync_verify_s": report.verify_seconds,
                "sync/method": report.method,
                "sync/verified": report.verified,
                "sync/reason": reason,
                # The label every server reported for the new weights (vLLM, SGLang); null where
                # none reports one (the built-in server, verified by its checksum instead).
                "sync/weight_version": report.weight_version,
            }
            rank_zero_info(f"weights synced to the server ({reason}, {report.method}) in {record.sync['time/sync_s']:.2f}s")
        trainer.strategy.barrier("weight_sync")


class EvaluationCallback(pl.Callback):
    """Scores the fixed eval set before training and every ``data.eval.interval`` iterations.

    With ``data.max_staleness >= 1`` the evaluation after iteration ``i`` runs on the service's
    evaluation thread while iteration ``i + 1`` trains; its results are written once it has
    finished (at the latest after the next iteration, whose sync waits for it, or at the end of
    the fit). A run killed before they were written evaluates that iteration's weights again
    when it resumes (they are exactly the restored weights)."""

    def __init__(self) -> None:
        self._pending: list[tuple[Future, str, int, int]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        assert isinstance(dm, RolloutDataModule)
        path = run_dir(trainer) / "metrics" / "eval_baseline.json"
        if dm.eval_config.baseline and dm.eval_config.num_problems and not path.exists() and trainer.is_global_zero:
            self.evaluate(trainer, "baseline", step=0, iteration=-1, wait=True)
        trainer.strategy.barrier("eval_baseline")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The loop's state is restored by now (it is not at ``on_fit_start``).
        done = trainer.current_epoch - 1  # the last completed iteration of a resumed run
        missing = not (run_dir(trainer) / "metrics" / f"eval_iter_{done:03d}.json").exists()
        if trainer.is_global_zero and done >= 0 and self.due(trainer, done) and missing:
            self.evaluate(trainer, f"iter_{done:03d}", step=done + 1, iteration=done, wait=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        i = trainer.current_epoch
        if trainer.is_global_zero:
            self.write_finished(trainer, wait=False)
            if self.due(trainer, i):
                last = trainer.max_epochs is not None and i == trainer.max_epochs - 1
                self.evaluate(trainer, f"iter_{i:03d}", step=i + 1, iteration=i, wait=last)
        trainer.strategy.barrier("eval")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write_finished(trainer, wait=True)

    @staticmethod
    def due(trainer: pl.Trainer, i: int) -> bool:
        cfg = trainer.datamodule.eval_config
        last = trainer.max_epochs is not None and i == trainer.max_epochs - 1
        return bool(cfg.num_problems) and ((i + 1) % cfg.interval == 0 or last)

    def evaluate(self, trainer: pl.Trainer, tag: str, step: int, iteration: int, wait: bool) -> None:
        """Evaluate the weights the server serves now (rank zero); ``wait``: write the results
        before returning."""
        self._pending.append((_service(trainer).submit_evaluation(), tag, step, iteration))
        self.write_finished(trainer, wait=wait)

    def write_finished(self, trainer: pl.Trainer, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][0].done()):
            future, tag, step, iteration = self._pending.pop(0)
            metrics, rollouts = future.result()
            self.write(trainer, tag, step, metrics, rollouts)
            if iteration >= 0:
                trainer.datamodule.record(iteration).eval = metrics

    def write(self, trainer: pl.Trainer, tag: str, step: int, metrics: dict[str, float], rollouts: list[Rollout]) -> None:
        write_json_atomic(run_dir(trainer) / "metrics" / f"eval_{tag}.json", {"step": step, **metrics})
        _log_scalars(trainer, {f"eval/{k}": v for k, v in metrics.items()}, step)
        tb = _tensorboard(trainer)
        if tb is not None:
            tb.add_histogram("eval/rewards", torch.tensor([r.reward for r in rollouts]), step)
            tb.add_text("eval/samples", _samples_markdown(rollouts, trainer.datamodule.eval_config.num_samples_logged), step)
        rank_zero_info(
            f"eval {tag}: success {metrics['success_rate']:.3f}, reward {metrics['reward_mean']:.3f} "
            f"({int(metrics['num_completions'])} completions, {metrics['time/eval_s']:.1f}s)"
        )


class MetricsFileCallback(pl.Callback):
    """Writes ``metrics/train_iter_XXX.json`` and the iteration's TensorBoard scalars and samples,
    from the iteration's record."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, GRPOModule)
        metrics = pl_module.iteration_summary()  # collective: every rank calls it
        if not trainer.is_global_zero:
            return
        i = trainer.current_epoch
        record = _record(trainer)
        sync = record.sync
        stats = {k: v for k, v in record.stats.items() if k != "problem_seeds"}
        payload = {"iteration": i, **stats, **metrics, **sync, "problem_seeds": record.stats.get("problem_seeds", [])}
        write_json_atomic(run_dir(trainer) / "metrics" / f"train_iter_{i:03d}.json", payload)
        _log_scalars(trainer, {**stats, **metrics, **{k: v for k, v in sync.items() if k.startswith("time/")}}, step=i)
        tb = _tensorboard(trainer)
        if tb is not None and record.rollouts:
            tb.add_histogram("train/rewards", torch.tensor([r.reward for r in record.rollouts]), i)
            tb.add_histogram("train/advantages", torch.tensor([r.advantage for r in record.rollouts]), i)
            tb.add_text("train/samples", _samples_markdown(record.rollouts, trainer.datamodule.num_samples_logged), i)
        rank_zero_info(
            f"iteration {i}: reward {stats.get('reward/reward_mean', math.nan):.3f}, success "
            f"{stats.get('reward/success_rate', math.nan):.3f}, loss {metrics.get('train/loss', math.nan):.4f}, "
            f"gen {stats.get('time/generate_s', 0):.1f}s train {metrics.get('time/train_s', 0):.1f}s "
            f"sync {sync.get('time/sync_s', 0):.2f}s wait {stats.get('time/wait_rollouts_s', 0):.1f}s "
            f"staleness {stats.get('rollout/staleness_max', 0)}"
        )


class HFCheckpointCallback(pl.Callback):
    """Hugging Face checkpoints ``checkpoints/iter_XXX/`` (servable by vLLM), keeping the last K."""

    def __init__(self, save_interval: int = 1, keep_last: int = 3) -> None:
        """
        Args:
            save_interval: save after every ``save_interval`` iterations (and after the last one).
            keep_last: keep this many HF checkpoints, newest by iteration number (numeric order,
                so iter_1000 sorts after iter_999); 0 keeps all.
        """
        if save_interval < 1:
            raise ValueError(f"HFCheckpointCallback.save_interval must be >= 1, got {save_interval}")
        if keep_last < 0:
            raise ValueError(f"HFCheckpointCallback.keep_last must be >= 0, got {keep_last}")
        self.save_interval = save_interval
        self.keep_last = keep_last

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, GRPOModule)
        i = trainer.current_epoch
        last = trainer.max_epochs is not None and i == trainer.max_epochs - 1
        if (trainer.is_global_zero or pl_module.sharded) and ((i + 1) % self.save_interval == 0 or last):
            folder = run_dir(trainer) / "checkpoints"
            synced = _record(trainer).synced
            same_as = synced[0] if synced is not None and synced[1] == trainer.global_step else None
            save_hf_atomic(pl_module, folder / f"iter_{i:03d}", same_as=same_as)
            if trainer.is_global_zero:
                self.prune(folder)
        trainer.strategy.barrier("hf_checkpoint")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not (isinstance(exception, NonFiniteError) and trainer.is_global_zero):
            return
        assert isinstance(pl_module, GRPOModule)
        folder = run_dir(trainer) / "checkpoints"
        # A sharded policy cannot be gathered from one rank alone: last.ckpt is what remains.
        if pl_module.policy is not None and not pl_module.sharded and all(torch.isfinite(p).all() for p in pl_module.policy.parameters()):
            # A skipped step never touches the weights: these are the weights after the last good step.
            exception.saved_to.append(str(save_hf_atomic(pl_module, folder / "last_good")))
        if (folder / "last.ckpt").is_file():
            exception.saved_to.append(f"{folder / 'last.ckpt'} (last completed iteration: resume with --ckpt_path last)")

    def prune(self, folder: Path) -> None:
        if self.keep_last == 0:
            return
        found = sorted(iteration_dirs(folder), key=lambda p: int(p.name.split("_")[1]))
        for old in found[: -self.keep_last]:
            shutil.rmtree(old)


def iteration_dirs(folder: Path) -> list[Path]:
    return [p for p in folder.glob("iter_*") if p.is_dir() and p.name.split("_")[1].isdigit()]


class IterationCheckpoint(Checkpoint):
    """``checkpoints/last.ckpt``, the resumable state: written after every iteration and once
    before the first, so that ``--ckpt_path last`` resumes a run killed at any point after its
    baseline evaluation and loses at most the iteration in progress.

    (Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last`` only when
    training ends: a crash would lose the whole run.)
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoint callbacks run last: this follows the baseline evaluation and precedes the
        # first rollouts (Lightning builds the first dataloader before ``on_train_start``).
        if trainer.ckpt_path is None:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        target = run_dir(trainer) / "checkpoints" / "last.ckpt"
        if not getattr(trainer.strategy, "_save_distributed_checkpoint", False):
            trainer.save_checkpoint(target, weights_only=False)  # a file, written atomically by AtomicCheckpointIO
            return
        # A sharded checkpoint is a folder every rank writes its slices into (the strategy, not
        # our CheckpointIO, writes it): written under a temporary name, then swapped in.
        tmp = target.with_name(target.name + ".tmp")
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.strategy.barrier("last_ckpt_tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # ends with a barrier
        if trainer.is_global_zero:
            swap_into(tmp, target)
        trainer.strategy.barrier("last_ckpt")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written under a temporary name and renamed into place, and read
    back with ``weights_only=True`` (tensors and plain values: unpickling runs no code)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        # A temporary name of our own: a kill mid-write leaves an orphan ``.tmp`` that nothing
        # reads (resume looks for ``last.ckpt``) and the next save overwrites.
        tmp = target.with_name(target.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        replace_durably(tmp, target)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(
                path, map_location=map_location or "cpu", weights_only=True if weights_only is None else weights_only
            )
        except pickle.UnpicklingError as exc:
            raise refused_checkpoint(path, exc) from exc


def refused_checkpoint(path: Any, exc: pickle.UnpicklingError) -> ValueError:
    """The one-line error for a checkpoint that ``weights_only`` unpickling rejected."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ValueError(f"refusing to load {path}: it is not a plain tensor checkpoint ({first})")
