"""GRPOModule: the policy, the frozen reference model (only with a KL term) and the GRPO loss.

One Lightning epoch is one GRPO iteration; each ``training_step`` gets one micro-batch of the
iteration's rollouts (see ``rollouts.build_schedule``) and the module steps the optimizer
itself (manual optimization) where a micro-batch closes an optimizer step. That keeps the
loss normalisation exact under any micro-batching and lets a non-finite step be skipped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from . import sharding
from .logprobs import sequence_token_logprobs, shared_prompt_token_logprobs
from .lora import LoraArgs, adapters_off, apply_lora, check_args, frozen_keys
from .loss import (
    LossConfig,
    Normalizer,
    Stat,
    combine_stats,
    finalize_stats,
    grpo_loss,
    loglinear_proximal,
    mean_stat,
    proximal_alpha,
)
from .models import load_policy, load_tokenizer

STALE_TIS_CAP = 2.0
"""``tis_cap`` when it is unset and rollouts may be stale (``max_staleness >= 1``)."""


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient, or the weights
    themselves became non-finite. ``saved_to`` lists where the last good weights were saved."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.saved_to: list[str] = []

    def __str__(self) -> str:
        saved = f"; last good weights: {', '.join(self.saved_to)}" if self.saved_to else ""
        return super().__str__() + saved


class GRPOModule(pl.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = "tiny-sat",
        trust_remote_code: bool = False,
        lr: float = 2e-6,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        max_grad_norm: float = 1.0,
        lr_schedule: Literal["constant", "cosine", "linear"] = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo",
        importance_level: Literal["token", "sequence"] = "token",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.28,
        kl_coef: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        entropy_coef: float = 0.0,
        tis_cap: float | None = None,
        num_iterations: int = 1,
        steps_per_iteration: int = 1,
        micro_batch_size: int = 4,
        max_tokens_per_micro_batch: int | None = None,
        logprob_chunk_size: int = 1024,
        gradient_checkpointing: bool = False,
        share_prompts: bool = True,
        max_consecutive_nonfinite: int = 3,
        temperature: float = 1.0,
        max_completion_length: int = 512,
        max_staleness: int = 0,
        proximal_logprobs: Literal["recompute", "loglinear"] = "recompute",
        lora: LoraArgs = LoraArgs(),
    ) -> None:
        """
        Args:
            model_name_or_path: the policy: a local Hugging Face folder, a hub id in the local
                cache, or ``tiny-sat`` (the built-in CPU demo model).
            trust_remote_code: allow the checkpoint's own modelling code (off: never run code
                from a checkpoint unless asked).
            lr: peak AdamW learning rate.
            betas: AdamW betas; (0.9, 0.95) as in most LLM RL recipes (the reference's value).
            weight_decay: AdamW decoupled weight decay (Loshchilov & Hutter 2019), applied to
                matrices only (not to biases and norm weights).
            max_grad_norm: clip the global gradient norm to this before each optimizer step.
            lr_schedule: ``constant``, ``cosine`` or ``linear`` decay to ``min_lr_ratio * lr``
                over the run's optimizer steps, after warmup.
            warmup_steps: optimizer steps of linear warmup; step ``k`` uses
                ``lr * (k + 1) / (warmup_steps + 1)``, so the first step is never a no-op
                (the reference's LR-0 first step is a bug).
            min_lr_ratio: final learning rate as a fraction of ``lr`` for decaying schedules.
            loss_type: how per-token losses are aggregated: ``grpo`` (token mean per sequence,
                then mean over sequences; Shao et al. 2024), ``bnpo`` (token sum / tokens in the
                step on this rank), ``dr_grpo`` (token sum / (sequences * max_completion_length);
                Liu et al. 2025), ``dapo`` (token sum / tokens in the step over all ranks;
                Yu et al. 2025).
            importance_level: importance ratio per ``token`` (PPO/GRPO) or per ``sequence``
                (length-normalised sequence ratio; GSPO, Zheng et al. 2025).
            epsilon_low: lower clip, ratio >= 1 - epsilon_low (PPO, Schulman et al. 2017).
            epsilon_high: upper clip, ratio <= 1 + epsilon_high; larger than epsilon_low is
                DAPO's clip-higher (Yu et al. 2025).
            kl_coef: weight of the KL penalty to the frozen initial policy; 0 loads no
                reference model at all.
            kl_estimator: per-token KL estimator k1, k2 or k3 (Schulman 2020, "Approximating
                KL divergence"); TRL uses k3, the reference k2.
            entropy_coef: weight of the entropy bonus (subtracted from the loss).
            tis_cap: truncated importance sampling (Yao et al. 2025): when set, the ratio is
                taken against the trainer's own log-probabilities at the start of the
                iteration and each token's policy-gradient term is weighted by
                ``min(pi_trainer / pi_server, tis_cap)``, correcting the server/trainer
                mismatch. None: with ``max_staleness`` 0 the ratio is taken against the
                server's log-probabilities; with ``max_staleness >= 1``, ``STALE_TIS_CAP`` (2,
                TRL's default cap) is used. Stale rollouts need it: clipped against the
                server's log-probabilities of a policy k iterations old, the ratio starts
                far from 1, PPO's clip stops most of the gradient and leaves unbounded the
                terms of negative-advantage tokens whose probability rose (on the CPU default
                at k = 1 the final eval success fell to 0.29-0.43 against 0.50-0.56
                synchronous). Clipping against the trainer's own start-of-iteration
                log-probabilities and weighting by the capped staleness ratio is the
                decoupled objective of asynchronous trainers (TRL's importance-sampling
                correction, AReaL's decoupled PPO).
            num_iterations: mu, passes over one iteration's rollouts (GRPO's inner epochs).
            steps_per_iteration: optimizer steps per pass; the rollouts are split evenly.
            micro_batch_size: sequences per forward/backward on each device (gradient
                accumulation inside a step; under DDP each step's sequences are first split
                over the ranks); ignored when ``max_tokens_per_micro_batch`` is set.
            max_tokens_per_micro_batch: token budget per micro-batch (padded tokens); sequences
                are sorted and packed so micro-batches carry little padding. None: fixed size.
            logprob_chunk_size: tokens per chunk of the LM-head log-softmax; the full
                [tokens x vocab] log-probabilities are never materialised.
            share_prompts: run each prompt once per micro-batch for all of its group's
                completions (its key/value cache is repeated for them) instead of once per
                completion; same values and gradients, several times less compute when prompts
                are long next to answers. Incompatible with gradient checkpointing, which
                drops the cache.
            gradient_checkpointing: recompute activations in the backward pass (less memory,
                about a third more compute).
            max_consecutive_nonfinite: stop the run after this many consecutive optimizer
                steps with a non-finite loss or gradient (each one is skipped and counted).
            temperature: linked from ``data.temperature``: log-probabilities are those of the
                sampling distribution at this temperature.
            max_completion_length: linked from ``data.max_tokens`` (Dr. GRPO's normaliser).
            max_staleness: linked from ``data.max_staleness``: with k >= 1, ``tis_cap``
                defaults to ``STALE_TIS_CAP``.
            proximal_logprobs: how the log-probabilities of the policy at the start of the
                iteration are found (the clip's centre and the TIS weight's numerator,
                whenever ``tis_cap`` is in effect and an iteration takes more than one
                optimizer step). ``recompute``: exactly, by one forward pass over the
                iteration's rollouts before its first step. ``loglinear``: with no forward
                pass, interpolated per token between the server's sampling log-probabilities
                and the current policy's, by how many optimizer steps each is from the start of
                the iteration (``loss.loglinear_proximal``). It is AReaL's ``loglinear``
                ``prox_logp_method`` (whose decoupled objective is Fu et al. 2025, "AReaL: a
                large-scale asynchronous reinforcement learning system for language
                reasoning"), aimed here at ``recompute``'s proximal policy, the start of the
                iteration, where AReaL's is one optimizer step behind the current policy.
                Exact at an iteration's first step. After it, rollouts of the
                iteration's own policy get the server's log-probabilities, so their TIS weight
                is 1 and no longer corrects the server/trainer mismatch: it needs
                ``max_staleness >= 1``, whose stale rollouts are what it is for.
            lora: train low-rank adapters instead of every weight (see ``lora.LoraArgs``).
        """
        super().__init__()
        self.lora = LoraArgs(**lora) if isinstance(lora, dict) else lora
        self.save_hyperparameters()
        # Plain values in checkpoints: they are read back with weights_only=True.
        self.hparams["lora"] = dataclasses.asdict(self.lora)
        # A LoRA checkpoint holds the adapter, not the frozen base weights (``on_save_checkpoint``).
        self.strict_loading = not self.lora.enabled
        self._validate()
        self.automatic_optimization = False
        self.loss_config = LossConfig(
            loss_type=loss_type,
            importance_level=importance_level,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            kl_coef=kl_coef,
            kl_estimator=kl_estimator,
            entropy_coef=entropy_coef,
            tis_cap=STALE_TIS_CAP if tis_cap is None and max_staleness >= 1 else tis_cap,
            max_completion_length=max_completion_length,
        )
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        # Held outside the module tree: never in state_dict, checkpoints or the optimizer.
        self._ref: list[torch.nn.Module] = []
        self._roots: dict[int, sharding.ShardedRoot] = {}
        """FSDP2 roots of the sharded policy and reference model, by ``id`` of the model."""
        self._stats: dict[str, Stat] = {}
        """This iteration's loss statistics, summed on the device: read once per iteration,
        so that a micro-batch costs no device-to-host copy for them."""
        self._step_stats: dict[str, list[float]] = {}
        self._epoch_t0 = 0.0
        self._train_seconds = 0.0
        self._consecutive_nonfinite = 0

    def _validate(self) -> None:
        h = self.hparams
        checks = {
            "lr": 0 < h.lr < math.inf,
            "betas": all(0 <= b < 1 for b in h.betas),
            "weight_decay": h.weight_decay >= 0,
            "max_grad_norm": 0 < h.max_grad_norm < math.inf,
            "warmup_steps": h.warmup_steps >= 0,
            "min_lr_ratio": 0 <= h.min_lr_ratio <= 1,
            "epsilon_low": 0 <= h.epsilon_low < 1,
            "epsilon_high": h.epsilon_high >= 0,
            "kl_coef": h.kl_coef >= 0,
            "entropy_coef": h.entropy_coef >= 0,
            "tis_cap": h.tis_cap is None or h.tis_cap >= 1,
            "num_iterations": h.num_iterations >= 1,
            "steps_per_iteration": h.steps_per_iteration >= 1,
            "micro_batch_size": h.micro_batch_size >= 1,
            "max_tokens_per_micro_batch": h.max_tokens_per_micro_batch is None or h.max_tokens_per_micro_batch >= 1,
            "logprob_chunk_size": h.logprob_chunk_size >= 1,
            "max_consecutive_nonfinite": h.max_consecutive_nonfinite >= 1,
            "temperature": 0 < h.temperature < math.inf,
            "max_completion_length": h.max_completion_length >= 1,
            "proximal_logprobs": h.proximal_logprobs in ("recompute", "loglinear"),
        }
        if h.share_prompts and h.gradient_checkpointing:
            raise ValueError(
                "model.share_prompts=true needs the key/value cache that model.gradient_checkpointing=true "
                "drops: set model.share_prompts false to use gradient checkpointing"
            )
        if h.proximal_logprobs == "loglinear" and h.max_staleness == 0:
            raise ValueError(
                "model.proximal_logprobs=loglinear interpolates the policy of stale rollouts, but data.max_staleness "
                "is 0: every rollout is the iteration's own, so the TIS weight would always be 1; use recompute"
            )
        if self.lora.enabled:
            check_args(self.lora)
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"model.{k}={h[k]!r}" for k in bad)
            raise ValueError(f"invalid model config: {values} (see --print_config for the allowed values)")

    # ------------------------------------------------------------------ models

    def configure_model(self, reference: bool = True) -> None:
        """Load the policy, and the frozen reference model when ``kl_coef > 0`` and ``reference``
        (with LoRA the reference is the policy with its adapters off: nothing more is loaded)."""
        if self.policy is not None:
            return
        h = self.hparams
        mesh = self._data_parallel_mesh()
        self.policy = load_policy(h.model_name_or_path, trust_remote_code=h.trust_remote_code)
        if self.lora.enabled:
            self.policy = apply_lora(self.policy, self.lora)
        elif reference and h.kl_coef > 0:
            # The initial policy, copied before anything changes it (no second read from disk).
            ref = copy.deepcopy(self.policy)
            ref.requires_grad_(False).eval()
            self._ref = [ref]
        self.policy.config.use_cache = False
        self.policy.train()
        if h.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            if self.lora.enabled:
                # Frozen embeddings: without this, reentrant checkpoints pass no gradient to the adapters.
                self.policy.enable_input_require_grads()
        if mesh is not None:
            bf16 = mesh.device_type == "cuda" and torch.cuda.is_bf16_supported()
            self._roots = {id(m): sharding.shard(m, mesh, mixed_precision=bf16) for m in [self.policy, *self._ref]}
        self.tokenizer = load_tokenizer(h.model_name_or_path, trust_remote_code=h.trust_remote_code)

    def _data_parallel_mesh(self) -> Any:
        """The device mesh to shard over under ``ModelParallelStrategy``; None otherwise."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return None
        tp, dp = mesh["tensor_parallel"].size(), mesh["data_parallel"].size()
        if tp > 1:
            raise ValueError(
                f"trainer.strategy.init_args.tensor_parallel_size={tp}: the policy is sharded with FSDP2 only "
                f"(no tensor-parallel plan); set tensor_parallel_size 1 and data_parallel_size {tp * dp} "
                "(trainer.devices x trainer.num_nodes)"
            )
        return mesh["data_parallel"]

    @property
    def sharded(self) -> bool:
        """True when the policy is FSDP2-sharded over the ranks: exporting it is then collective."""
        return sharding.is_sharded(self.policy)

    @property
    def ref_model(self) -> torch.nn.Module | None:
        return self._ref[0] if self._ref else None

    @property
    def has_reference(self) -> bool:
        """Whether reference log-probabilities enter the loss (a KL term with a reference)."""
        return self.ref_model is not None or (self.lora.enabled and self.hparams.kl_coef > 0 and self.policy is not None)

    def reference(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The reference policy: the frozen copy, or with LoRA the policy with its adapters off."""
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        return adapters_off(self.policy)

    def on_fit_start(self) -> None:
        if self.ref_model is not None:
            self.ref_model.to(self.device)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        assert self.policy is not None
        params = [p for p in self.policy.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=h.lr,
            betas=tuple(h.betas),
        )
        if self.sharded:
            sharding.initialise_optimizer_state(opt)
        total = self._total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, h, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_steps(self) -> int:
        epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 1
        return max(1, epochs * self.hparams.num_iterations * self.hparams.steps_per_iteration)

    # ------------------------------------------------------------------ training

    def logprobs(self, model: torch.nn.Module, batch: dict[str, Any], with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        options = {
            "temperature": self.hparams.temperature,
            "chunk_size": self.hparams.logprob_chunk_size,
            "with_entropy": with_entropy,
            "loss_positions": batch["loss_mask"].bool(),
        }
        if "prompt_ids" in batch:  # rollouts.collate_shared
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "group_index")
            return self._run(model, shared_prompt_token_logprobs, *(batch[k] for k in keys), **options)
        return self._run(model, sequence_token_logprobs, batch["input_ids"], batch["attention_mask"], **options)

    def _run(self, model: torch.nn.Module, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args)``, through the model's FSDP2 root when it is sharded."""
        root = self._roots.get(id(model))
        return fn(model, *args, **kwargs) if root is None else sharding.call(root, fn, *args, **kwargs)

    def on_train_epoch_start(self) -> None:
        self._stats = {}
        self._step_stats = {"grad_norm": [], "lr": [], "skipped": [], "steps": []}
        self._epoch_t0 = time.perf_counter()
        self._precompute_fixed_logprobs()

    @torch.no_grad()
    def _precompute_fixed_logprobs(self) -> None:
        """Reference and old-policy log-probabilities, once per iteration (before any step), for
        every rollout this rank trains on in any pass (passes deal rollouts to ranks afresh).

        They stay here, in ``self._fixed[key][rollout index]`` (the rollout's loss-token values,
        on the host), and ``_fixed_logprobs`` lays them out for each micro-batch: the dataset
        and its rollouts are never written to."""
        h = self.hparams
        self._fixed = {}
        need_ref = self.has_reference
        # With a single optimizer step per iteration the old policy is the current one:
        # training_step uses its own detached log-probabilities, no extra forward pass.
        need_old = (self.loss_config.tis_cap is not None and h.num_iterations * h.steps_per_iteration > 1
                    and h.proximal_logprobs == "recompute")
        if not (need_ref or need_old):
            return
        micro = self.trainer.train_dataloader.dataset
        seen: set[int] = set()
        todo: list[int | None] = []
        for k, mb in enumerate(micro.schedule):
            if mb.indices and not set(mb.indices) <= seen:
                seen.update(mb.indices)
                todo.append(k)
        if self.sharded and micro.schedule:
            # A sharded model's forward is collective: every rank runs as many as the busiest
            # one, the others on a micro-batch whose results they drop.
            most = self.trainer.strategy.reduce(torch.tensor(len(todo), device=self.device), reduce_op="max")
            todo += [None] * (int(most) - len(todo))
        fixed: dict[str, dict[int, torch.Tensor]] = {key: {} for key, need in (("ref_logprobs", need_ref), ("old_logprobs", need_old)) if need}
        for k in todo:
            batch = self.trainer.strategy.batch_to_device(micro[0 if k is None else k], self.device)
            outs = {}
            # The same autocast as training_step (bf16-mixed on CUDA), or KL and ratios would
            # start away from 0 and 1 by the precision gap alone.
            with self.trainer.precision_plugin.forward_context():
                if need_ref:
                    with self.reference() as ref:
                        outs["ref_logprobs"] = self.logprobs(ref, batch, with_entropy=False)[0]
                if need_old:
                    self.policy.eval()
                    outs["old_logprobs"] = self.logprobs(self.policy, batch, with_entropy=False)[0]
                    self.policy.train()
            if k is None:
                continue
            # One copy to the host per micro-batch; row-wise masking on the device would sync per row.
            mask = batch["loss_mask"].bool().cpu()
            for key, lp in outs.items():
                lp = lp.float().cpu()
                for row, idx in enumerate(micro.schedule[k].indices):
                    fixed[key][idx] = lp[row][mask[row]]
        self._fixed = fixed

    _fixed: dict[str, dict[int, torch.Tensor]] = {}

    def _fixed_logprobs(self, batch: dict[str, Any], key: str, logp: torch.Tensor) -> torch.Tensor:
        """The micro-batch's precomputed ``key`` log-probabilities, shaped like ``logp`` (zeros
        outside the loss mask). Nothing is precomputed for old logprobs with one step per
        iteration (the current policy's are used) and for an empty micro-batch (DDP padding)."""
        one_step = self.hparams.num_iterations * self.hparams.steps_per_iteration == 1
        rows = batch["rollout_indices"]  # a host list: deciding reads nothing from the device
        if (key == "old_logprobs" and one_step) or not rows:
            return logp.detach()
        stored = self._fixed.get(key, {})
        if any(i not in stored for i in rows):
            raise RuntimeError(f"{key} missing for micro-batch rollouts {rows} (not precomputed)")
        values = torch.cat([stored[i] for i in rows]).to(logp.device, non_blocking=True)
        # Row-major, like the concatenation: each row's loss tokens in order.
        return torch.zeros(logp.shape, dtype=torch.float32, device=logp.device).masked_scatter_(batch["loss_mask"].bool(), values)

    def _old_logprobs(self, batch: dict[str, Any], logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, Stat]]:
        """The start-of-iteration policy's log-probabilities for the micro-batch: precomputed,
        or (``proximal_logprobs: loglinear``) interpolated from the rollouts' versions. With
        ``max_staleness >= 1`` and ``recompute`` the interpolation is computed too, and its
        error against the exact values logged (``proximal/loglinear_abs_error``), so that a run
        shows what switching to ``loglinear`` would change."""
        h = self.hparams
        approx = None
        if h.max_staleness >= 1:
            steps = h.num_iterations * h.steps_per_iteration
            # Policy versions count iterations; the interpolation counts optimizer steps.
            behind = [(self.trainer.current_epoch - v) * steps for v in batch["policy_versions"]] or [0] * logp.shape[0]
            alpha = proximal_alpha(torch.tensor(behind), batch["step"])
            approx = loglinear_proximal(logp, batch["behaviour_logprobs"], batch["loss_mask"], alpha)
        if h.proximal_logprobs == "loglinear":
            assert approx is not None  # _validate: loglinear needs max_staleness >= 1
            return approx, {}
        exact = self._fixed_logprobs(batch, "old_logprobs", logp)
        if approx is None:
            return exact, {}
        return exact, {"proximal/loglinear_abs_error": mean_stat((approx - exact).abs(), batch["loss_mask"].to(exact.dtype))}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.policy is not None
        opt = self.optimizers()
        mask = batch["loss_mask"]
        logp, entropy = self.logprobs(self.policy, batch, with_entropy=True)
        if entropy is not None and self.hparams.entropy_coef == 0:
            entropy = entropy.detach()
        old_logp, prox_stats = self._old_logprobs(batch, logp) if self.loss_config.tis_cap is not None else (None, {})
        out = grpo_loss(
            logp,
            batch["behaviour_logprobs"],
            batch["advantages"],
            mask,
            self.loss_config,
            Normalizer(**batch["normalizer"]),
            old_logp=old_logp,
            ref_logp=self._fixed_logprobs(batch, "ref_logprobs", logp) if self.has_reference else None,
            entropy=entropy,
        )
        loss = out.loss
        # Backward even a non-finite loss: under DDP every rank must join every gradient
        # all-reduce or the ranks deadlock. The step is skipped below, its gradients discarded.
        self.manual_backward(loss)
        self._stats = combine_stats([self._stats, {k: Stat(v.value.detach(), v.count.detach(), v.reduce) for k, v in out.stats.items()},
                                     prox_stats])
        # Summed on the device: the host reads it once per step, and a non-finite micro-batch
        # loss makes the sum non-finite, which is how the step learns to skip itself.
        self._step_loss = self._step_loss + loss.detach()
        if batch["step_end"]:
            step_loss = self._optimizer_step(opt)
            # A host tensor: Lightning reads logged values back at every batch, which for a
            # device tensor would be a synchronisation per micro-batch.
            self.log("loss", torch.tensor(step_loss), prog_bar=True, logger=False, batch_size=1)
        self._train_seconds = time.perf_counter() - self._epoch_t0
        return loss.detach()

    _step_loss: torch.Tensor | float = 0.0

    def _optimizer_step(self, opt: Any) -> float:
        """Clip, step (unless the loss or gradient is non-finite), schedule; returns the step's loss."""
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.hparams.max_grad_norm) if params else torch.tensor(0.0)
        grad_norm = sharding.full_norm(grad_norm)
        step_loss = torch.as_tensor(self._step_loss, device=self.device).float()
        bad_loss = (~torch.isfinite(step_loss)).float()
        if self.trainer.world_size > 1:
            # Gradients are all-reduced, so every rank sees the same norm; a non-finite loss is
            # local: every rank must skip the same steps or their weights drift apart.
            bad_loss = self.trainer.strategy.reduce(bad_loss, reduce_op="sum")
        # The step's one read back to the host.
        grad_norm_value, bad, step_loss_value = torch.stack([grad_norm.detach().float().to(self.device), bad_loss, step_loss]).tolist()
        self._step_loss = 0.0
        finite = math.isfinite(grad_norm_value) and bad == 0
        self._step_stats["lr"].append(float(opt.param_groups[0]["lr"]))
        self._step_stats["steps"].append(1.0)
        if finite:
            opt.step()
            self._consecutive_nonfinite = 0
            self._step_stats["grad_norm"].append(grad_norm_value)
        else:
            self._consecutive_nonfinite += 1
            self._step_stats["skipped"].append(1.0)
            rank_zero_warn(
                f"iteration {self.current_epoch}: non-finite loss or gradient, optimizer step skipped "
                f"({self._consecutive_nonfinite} in a row)"
            )
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        if self._consecutive_nonfinite >= self.hparams.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{self._consecutive_nonfinite} consecutive optimizer steps had a non-finite loss or gradient "
                f"(model.max_consecutive_nonfinite={self.hparams.max_consecutive_nonfinite}); the run stopped"
            )
        return step_loss_value

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Never replace the last good checkpoint with weights that cannot be trained on.
        # Sharded (a distributed checkpoint): each rank checks its slices, and all ranks agree.
        state = {k: sharding.local(v) for k, v in checkpoint["state_dict"].items()}
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if self.sharded and self.trainer.strategy.reduce(torch.tensor(float(len(bad)), device=self.device), reduce_op="sum") > 0:
            bad = bad or ["on another rank"]
        if bad:
            raise NonFiniteError(f"the policy has non-finite weights ({', '.join(bad[:3])}); refusing to checkpoint them")
        if self.lora.enabled:
            for key in frozen_keys(self):
                checkpoint["state_dict"].pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora.enabled:
            # Loading is not strict (the frozen base is not in the file): every adapter must be.
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            missing = sorted(trainable - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(f"the checkpoint has no weights for {len(missing)} adapter tensors ({missing[0]}, ...): "
                                 "was it written with the same model.lora settings?")

    def iteration_summary(self) -> dict[str, float]:
        """This iteration's training metrics, combined over micro-batches and ranks.

        Collective under DDP: every rank must call it (the metrics callback does).
        """
        stats = {k: Stat(v.value.cpu(), v.count.cpu(), v.reduce) for k, v in self._stats.items()}
        if self.trainer.world_size > 1:
            stats = self._reduce_across_ranks(stats)
        metrics = {f"train/{k}": v for k, v in finalize_stats(stats).items()}
        if self.trainer.world_size > 1:
            # Each rank's loss parts carry the world_size factor that undoes DDP's (and FSDP's)
            # gradient average; summed over ranks they are world_size times the objective the
            # averaged gradient follows: report that objective, as one process would.
            metrics |= {k: v / self.trainer.world_size for k, v in metrics.items() if k.startswith("train/loss/")}
        metrics["train/loss"] = sum(v for k, v in metrics.items() if k.startswith("train/loss/") and math.isfinite(v))
        s = self._step_stats
        metrics["train/grad_norm"] = sum(s["grad_norm"]) / len(s["grad_norm"]) if s["grad_norm"] else math.nan
        metrics["train/grad_norm_max"] = max(s["grad_norm"], default=math.nan)
        metrics["train/lr"] = s["lr"][-1] if s["lr"] else math.nan
        metrics["train/optimizer_steps"] = float(len(s["steps"]) - len(s["skipped"]))
        metrics["train/nonfinite_steps_skipped"] = float(len(s["skipped"]))
        metrics["time/train_s"] = self._train_seconds
        if self.device.type == "cuda":
            # The run's peak so far (this process's allocator), to size micro-batches and the server's share.
            metrics["device/max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _reduce_across_ranks(self, stats: dict[str, Stat]) -> dict[str, Stat]:
        """Combine each rank's stats exactly (sums and counts add, extremes reduce)."""
        gathered = self.all_gather(
            {k: torch.stack([v.value.float(), v.count.float()]).to(self.device) for k, v in stats.items()}
        )
        parts = []
        for r in range(self.trainer.world_size):
            parts.append({k: Stat(g[r][0].cpu(), g[r][1].cpu(), stats[k].reduce) for k, g in gathered.items()})
        return combine_stats(parts)

    # ------------------------------------------------------------------ export

    def save_hf(self, directory: str | Path) -> Path:
        """Write the policy as a Hugging Face folder (safetensors) loadable by transformers and vLLM.

        Collective when the policy is sharded: every rank calls it, rank 0 writes."""
        assert self.policy is not None
        out = Path(directory)
        if self.sharded:  # collective: every rank gathers, rank 0 writes
            sharding.save_pretrained_sharded(self.policy, out, write=self.global_rank == 0)
            if self.global_rank == 0:
                self.tokenizer.save_pretrained(out)
            return out
        out.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        return out

    @torch.no_grad()
    def probe_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """The policy's log-probabilities of ``completion_ids`` after ``prompt_ids`` (weight-sync probe)."""
        assert self.policy is not None
        ids = torch.tensor([prompt_ids + completion_ids], device=self.device)
        mask = torch.zeros((1, ids.shape[1] - 1), dtype=torch.bool, device=self.device)
        mask[0, len(prompt_ids) - 1 :] = True
        was_training = self.policy.training
        self.policy.eval()
        logp, _ = self._run(
            self.policy, sequence_token_logprobs, ids, torch.ones_like(ids), temperature=1.0, loss_positions=mask
        )
        self.policy.train(was_training)
        return logp[0, len(prompt_ids) - 1 :].tolist()


def lr_factor(step: int, h: Any, total: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based)."""
    if step < h.warmup_steps:
        return (step + 1) / (h.warmup_steps + 1)
    if h.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - h.warmup_steps) / max(1, total - h.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if h.lr_schedule == "cosine" else 1 - progress
    return h.min_lr_ratio + (1 - h.min_lr_ratio) * shape
