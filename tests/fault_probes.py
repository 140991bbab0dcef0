"""Test-only fault injection for fit runs (loaded like ``ddp_probe``: ``--trainer.callbacks+=fault_probes.Kill``)
and the entry point of forked trainer processes that tests SIGKILL.

Faults are triggered by what the run is doing, not by timers, so every kill lands in the phase
it names: ``generation`` (the iteration's rollouts: one request answered, the others in
flight or queued), ``training`` (after a given micro-batch), ``sync`` (just before the
iteration's new weights are pushed to the server), ``evaluation`` (the evaluation after the
iteration: one request answered) and ``checkpoint`` (``last.ckpt`` half written).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

import grpo_lightning.callbacks as callbacks_module
from grpo_lightning.cli import main

PHASES = ("generation", "training", "sync", "evaluation", "checkpoint")


class Kill(pl.Callback):
    """SIGKILL ``target`` during ``phase`` of ``iteration``, once.

    Args:
        phase: one of ``PHASES``.
        iteration: the iteration (epoch) whose phase is hit.
        target: ``self`` (this trainer), ``server`` (the managed server it launched) or a pid
            (e.g. an attached server's).
        batch: for ``training``, the micro-batch after which to strike.
    """

    def __init__(self, phase: str, iteration: int, target: str = "self", batch: int = 0) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}")
        self.phase, self.iteration, self.target, self.batch = phase, iteration, target, batch
        self.fired = False
        self._epoch: int | None = None
        self._doing: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        service = trainer.datamodule.service
        for name, phase in (("iteration", "generation"), ("evaluate", "evaluation")):
            if service is not None:
                setattr(service, name, self._marking(getattr(service, name), phase))
        client = service.client if service is not None else None
        if client is not None:
            generate = client.generate

            def generate_and_strike(requests: list[Any], on_done: Any = None) -> Any:
                def done(i: int) -> None:
                    if on_done is not None:
                        on_done(i)
                    if self._doing == self.phase and self._armed(trainer):
                        self._strike(trainer)

                return generate(requests, on_done=done)

            client.generate = generate_and_strike
        if self.phase == "sync" and service is not None:
            sync = service.sync

            def strike_then_sync(*args: Any, **kwargs: Any) -> Any:
                if self._armed(trainer):
                    self._strike(trainer)
                return sync(*args, **kwargs)

            service.sync = strike_then_sync
        if self.phase == "checkpoint":
            replace = callbacks_module.replace_durably

            def replace_or_strike(tmp: Path, target: Path) -> None:
                if target.name == "last.ckpt" and self._armed(trainer):
                    with open(tmp, "r+b") as f:  # the kill lands halfway through the write
                        f.truncate(os.path.getsize(tmp) // 2)
                    self._strike(trainer)
                replace(tmp, target)

            callbacks_module.replace_durably = replace_or_strike

    def _marking(self, method: Any, phase: str) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._doing = phase
            try:
                return method(*args, **kwargs)
            finally:
                self._doing = None

        return wrapped

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = trainer.current_epoch
        if self.phase == "generation" and self.iteration == trainer.current_epoch and not self.fired:
            raise AssertionError("the generation of this iteration ran without striking")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.phase == "training" and batch_idx == self.batch and self._armed(trainer):
            self._strike(trainer)

    def _armed(self, trainer: pl.Trainer) -> bool:
        if self.fired or trainer.current_epoch != self.iteration:
            return False
        # The rollouts of iteration i are generated before its epoch starts; the evaluation
        # and checkpoint that follow it happen inside the epoch (so never the baseline).
        return self.phase == "generation" or self._epoch == self.iteration

    def _strike(self, trainer: pl.Trainer) -> None:
        self.fired = True
        if self.target == "self":
            os.kill(os.getpid(), signal.SIGKILL)
        pid = trainer.datamodule.service.pid if self.target == "server" else int(self.target)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)


class KillAhead(pl.Callback):
    """SIGKILL ``target`` (``self``, ``server`` or a pid) while iteration ``iteration``'s rollouts are
    generated ahead (``data.max_staleness >= 1``, on the service's generation thread): when its
    first request is answered (the others in flight or queued) and iteration ``iteration - 1``
    has started training (the strike waits for it, so it lands in that phase). Once."""

    def __init__(self, iteration: int, target: str = "server") -> None:
        self.iteration, self.target = iteration, target
        self.fired = False
        self.training = threading.Event()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.iteration - 1:
            self.training.set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        service = trainer.datamodule.service
        if service is None:
            return
        iteration, client_generate = service.iteration, service.client.generate
        local = threading.local()

        def marked(j: int, *args: Any, **kwargs: Any) -> Any:
            local.j = j
            try:
                return iteration(j, *args, **kwargs)
            finally:
                local.j = None

        def generate_and_strike(requests: list[Any], on_done: Any = None) -> Any:
            def done(i: int) -> None:
                if on_done is not None:
                    on_done(i)
                if getattr(local, "j", None) == self.iteration and not self.fired:
                    self.fired = True
                    self.training.wait(timeout=300)
                    Path(trainer.log_dir, f"killed_{self.target if self.target in ('self', 'server') else 'pid'}_at_epoch").write_text(str(trainer.current_epoch))
                    pids = {"self": os.getpid(), "server": service.pid}
                    os.kill(pids.get(self.target) or int(self.target), signal.SIGKILL)

            return client_generate(requests, on_done=done)

        service.iteration, service.client.generate = marked, generate_and_strike


class NonFinite(pl.Callback):
    """Makes micro-batches of the given iterations non-finite: ``loss_batches`` get NaN
    advantages (so a NaN loss), ``grad_batches`` a NaN gradient with a finite loss."""

    def __init__(self, iterations: list[int], loss_batches: list[int] | None = None, grad_batches: list[int] | None = None) -> None:
        self.iterations = set(iterations)
        self.loss_batches = set(loss_batches or [])
        self.grad_batches = set(grad_batches or [])
        self._hook: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch not in self.iterations:
            return
        if batch_idx in self.loss_batches:
            batch["advantages"].fill_(float("nan"))
        if batch_idx in self.grad_batches:
            param = next(pl_module.policy.parameters())
            self._hook = param.register_hook(lambda g: torch.full_like(g, float("nan")))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def run_cli(argv: list[str], log_prefix: str) -> None:
    """A forked trainer: ``main(argv)`` with stdout/stderr in ``<log_prefix>.out``/``.err``, one
    torch thread; the exit code is ``main``'s."""
    # One thread: on a busy shared machine more threads spin against each other (and every
    # launch of a chain must use the same count for its results to be reproducible).
    torch.set_num_threads(1)
    for fd, suffix in ((1, ".out"), (2, ".err")):
        f = os.open(log_prefix + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
