"""The GRPO objective as pure functions of per-token tensors (no Lightning, no model).

Per token ``t`` of completion ``i`` (all tensors completion-aligned ``[B, T]``):

    l_it = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) * w_it      policy term
           + kl_coef * KL_it                                                     KL to a reference
           - entropy_coef * H_it                                                 entropy bonus

* ``r`` is the importance ratio ``pi_theta / pi_old``; clipping is PPO's, with DAPO's
  decoupled "clip-higher" bounds (Yu et al. 2025; defaults 0.2 / 0.28).
* ``importance_level="sequence"`` is GSPO (Zheng et al. 2025): every token of a completion
  uses the length-normalised sequence ratio ``exp(mean_t log r_it)``.
* ``w`` is 1, or with ``tis_cap`` the truncated importance-sampling weight of TIS (Yao et al.
  2025, "Your efficient RL framework secretly brings you off-policy RL training"), which
  corrects the mismatch between the inference server's sampling probabilities and the
  trainer's, including rollouts sampled by an older policy (``data.max_staleness >= 1``, where
  ``pi_old`` is the trainer at the start of the iteration and the clip is taken against it):
  ``w = min(pi_old / pi_behaviour, tis_cap)``.
* KL uses one of Schulman's (2020, "Approximating KL divergence") estimators k1/k2/k3.
* The advantages ``A_i`` come from :mod:`grpo_lightning.advantages` (GRPO, Shao et al. 2024).

Aggregation (``loss_type``) and micro-batches
--------------------------------------------
The loss returned for a micro-batch is ``sum_it c_it * mask_it * l_it`` with constant weights
``c`` computed from the *optimizer-step* totals in :class:`Normalizer`, so that summing the
returned losses of all micro-batches of a step gives the full-batch objective whatever the
split (which is what lets token-budget packing reorder and regroup sequences without changing
the gradient; gradient accumulation in Lightning sums the micro-batch gradients once the loss
is not divided by the number of accumulation steps):

* ``grpo``: ``sum_i (sum_t m l / |y_i|) / num_sequences`` (GRPO: mean over sequences of each
  sequence's token mean; biases towards short answers, per Dr. GRPO).
* ``bnpo``: ``sum m l / num_tokens_local`` (token mean over this rank's step batch).
* ``dapo``: ``sum m l / num_tokens_global * world_size`` (DAPO's token-level mean over the
  whole step batch, all ranks).
* ``dr_grpo``: ``sum m l / (num_sequences * max_completion_length)`` times ``world_size``
  (Dr. GRPO, Liu et al. 2025: a constant normaliser, no length bias).

Normalisers that count all ranks are multiplied by ``world_size`` because DDP *averages*
gradients over ranks. With one process ``bnpo == dapo``; with several, ``bnpo`` is the mean
over ranks of each rank's token mean. TRL and the offline GRPO runner this project replaces
normalise ``grpo``, ``bnpo`` and ``dr_grpo`` per *micro-batch* (the mean, token mean or
``B * max_len`` of the micro-batch, then an average over accumulation steps), so there the
gradient depends on how sequences are grouped into micro-batches; their ``dapo`` uses the
step's global token count as here. With equal micro-batches (same number of sequences and
of tokens each) the two conventions give the same gradient.

Metrics come back as :class:`Stat` values (sums and counts, or extremes) so that callers can
combine them exactly over micro-batches (:func:`combine_stats`) and ranks (all-reduce the
``value`` of "mean"/"sum" stats with SUM and their ``count`` with SUM, "min" with MIN, "max"
with MAX) before :func:`finalize_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceLevel = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k2", "k3"]
Reduce = Literal["mean", "sum", "min", "max"]

__all__ = [
    "ImportanceLevel",
    "KLEstimator",
    "LossConfig",
    "LossOutput",
    "LossType",
    "Normalizer",
    "Stat",
    "aggregation_weights",
    "combine_stats",
    "finalize_stats",
    "grpo_loss",
    "kl_estimate",
    "loglinear_proximal",
    "mean_stat",
    "proximal_alpha",
]


@dataclass(frozen=True)
class LossConfig:
    """Options of the GRPO objective.

    Attributes:
        loss_type: how per-token losses are aggregated (module docstring): ``"grpo"``
            (DeepSeekMath), ``"bnpo"``, ``"dr_grpo"`` (Liu et al. 2025), ``"dapo"`` (Yu et al.
            2025, the default, as in TRL).
        importance_level: ``"token"`` (PPO/GRPO ratio per token) or ``"sequence"`` (GSPO,
            Zheng et al. 2025: the geometric-mean ratio of the whole completion).
        epsilon_low: lower clip range, the ratio is clipped at ``1 - epsilon_low``.
        epsilon_high: upper clip range, ``1 + epsilon_high`` (DAPO's clip-higher: larger than
            ``epsilon_low`` so that unlikely tokens can gain probability; GSPO uses ~3e-4/4e-4).
        kl_coef: weight of the KL penalty to the reference policy (0 disables it and the
            reference model is not needed).
        kl_estimator: Schulman 2020 estimator of KL(pi_theta || pi_ref) per token: ``"k1"``
            (unbiased, high variance, can be negative), ``"k2"`` (squared log-ratio, low
            variance, biased), ``"k3"`` (unbiased and non-negative, GRPO's and TRL's choice).
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        tis_cap: truncated importance sampling (Yao et al. 2025): each token's policy term is
            multiplied by ``min(exp(old_logp - behaviour_logp), tis_cap)``; ``None`` = off.
            Requires ``old_logp``. TRL's ``vllm_importance_sampling_correction`` (cap 3.0
            there; 2.0 is a common choice).
        max_completion_length: the constant normaliser of ``dr_grpo`` (the generation limit).
    """

    loss_type: LossType = "dapo"
    importance_level: ImportanceLevel = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    max_completion_length: int = 512

    def __post_init__(self) -> None:
        if self.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
            raise ValueError(f"unknown loss_type {self.loss_type!r}")
        if self.importance_level not in ("token", "sequence"):
            raise ValueError(f"unknown importance_level {self.importance_level!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}")
        if not (0.0 <= self.epsilon_low < 1.0) or self.epsilon_high < 0.0:
            raise ValueError(
                f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {self.epsilon_low}, {self.epsilon_high}"
            )
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.tis_cap is not None and self.tis_cap < 1:
            # Below 1 the cap would down-weight tokens the two engines agree on.
            raise ValueError(f"tis_cap must be >= 1 or None, got {self.tis_cap}")
        if self.max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be positive, got {self.max_completion_length}")


@dataclass(frozen=True)
class Normalizer:
    """Totals over the *optimizer-step batch* (all micro-batches accumulated into one step).

    Attributes:
        num_sequences: completions in the step batch, all ranks (``grpo``, ``dr_grpo``),
            including those with no loss tokens (empty, or truncated under
            ``mask_truncated_completions``): TRL's ``grpo`` takes the mean over every row of the
            batch and its ``dr_grpo`` divides by the batch size, masked rows included.
        num_tokens_local: loss tokens (mask ones) in the step batch on this rank (``bnpo``).
        num_tokens_global: loss tokens in the step batch on all ranks (``dapo``).
        world_size: number of data-parallel ranks whose gradients DDP averages.
    """

    num_sequences: int
    num_tokens_local: int
    num_tokens_global: int
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.num_sequences < 0 or self.num_tokens_local < 0:
            raise ValueError(f"invalid normaliser {self}")
        if self.num_tokens_global < self.num_tokens_local:
            raise ValueError(f"num_tokens_global < num_tokens_local in {self}")

    @classmethod
    def from_mask(cls, mask: Tensor) -> Normalizer:
        """The normaliser of a single-process step whose whole batch has loss mask ``mask``."""
        tokens = int(mask.bool().sum())
        return cls(num_sequences=int(mask.shape[0]), num_tokens_local=tokens, num_tokens_global=tokens)


@dataclass(frozen=True)
class Stat:
    """A metric in a form that combines exactly across micro-batches and ranks.

    Attributes:
        value: for ``"mean"`` and ``"sum"`` the sum of the values; for ``"min"``/``"max"``
            the extreme (``+inf``/``-inf`` when nothing was seen). Detached scalar.
        count: how many elements went into ``value`` (the denominator of a mean).
        reduce: ``"mean"`` (finalised as value / count), ``"sum"`` (value), ``"min"``, ``"max"``.
    """

    value: Tensor
    count: Tensor
    reduce: Reduce


@dataclass
class LossOutput:
    """Result of :func:`grpo_loss`.

    Attributes:
        loss: scalar with grad; sum it over the micro-batches of a step.
        stats: metrics (see :func:`grpo_loss` for the names), each a :class:`Stat`.
    """

    loss: Tensor
    stats: dict[str, Stat] = field(default_factory=dict)


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probabilities.

    With ``d = ref_logp - logp`` (Schulman 2020, "Approximating KL divergence"):
    ``k1 = -d``, ``k2 = d^2 / 2``, ``k3 = exp(d) - d - 1``.
    """
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        # expm1 keeps precision when the policies are close (d ~ 0), the usual case.
        return torch.expm1(d) - d
    raise ValueError(f"unknown kl_estimator {estimator!r}")


def proximal_alpha(steps_behind: Tensor, step: int) -> Tensor:
    """Per-sequence interpolation weight of :func:`loglinear_proximal`.

    Versions count optimizer steps. For a sequence whose behaviour policy is ``steps_behind``
    steps older than the policy at the start of the iteration (the proximal one), trained at
    optimizer step ``step`` of the iteration (0 = the first),
    ``alpha = (v_prox - v_behave) / (v_theta - v_behave) = steps_behind / (steps_behind + step)``.
    At the first step it is 1 for every sequence: the current policy *is* the proximal one. A
    sequence sampled by the iteration's own policy (``steps_behind = 0``) gets 0 after that:
    its behaviour log-probabilities are the proximal policy's, up to the server's numerics.
    """
    behind = steps_behind.to(torch.float64)
    if step == 0:
        return torch.ones_like(behind)
    return behind / (behind + step)


def loglinear_proximal(logp: Tensor, behaviour_logp: Tensor, mask: Tensor, alpha: Tensor) -> Tensor:
    """The proximal policy's log-probabilities without a forward pass (AReaL's ``loglinear``
    ``prox_logp_method``): ``log pi_prox = log pi_behave + alpha (log pi_theta - log pi_behave)``
    per token, with ``alpha`` per sequence from :func:`proximal_alpha`. No gradient; zeros
    outside ``mask``.

    Decoupled PPO clips against the policy at the start of the iteration; computing it exactly
    costs one forward pass over the iteration's rollouts. This interpolates it between the two
    policies at hand, by how far each one is from it in optimizer steps: exact at the first
    step of an iteration, the server's log-probabilities for sequences of the iteration's own
    policy, an approximation in between (the policy is assumed to move evenly in log space
    from one optimizer step to the next).
    """
    dtype = torch.promote_types(logp.dtype, torch.float32)
    mb = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    behaviour = torch.where(mb, behaviour_logp.detach().to(dtype), zero)
    current = torch.where(mb, logp.detach().to(dtype), zero)
    a = alpha.to(dtype).to(logp.device, non_blocking=True)[:, None]
    return torch.where(mb, behaviour + a * (current - behaviour), zero)


def aggregation_weights(
    mask: Tensor, cfg: LossConfig, norm: Normalizer, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Constant per-token weights ``c * mask`` (in ``dtype``) with ``loss = sum(weights * l)``."""
    m = mask.to(dtype)
    ws = norm.world_size
    if cfg.loss_type == "grpo":
        # A completion without loss tokens (empty, or truncated and masked) adds 0 to the sum but
        # counts in num_sequences, as in TRL: the normaliser is the step's number of samples.
        lengths = m.sum(dim=1, keepdim=True).clamp(min=1.0)
        return m / lengths * (ws / max(norm.num_sequences, 1))
    if cfg.loss_type == "bnpo":
        return m / max(norm.num_tokens_local, 1)
    if cfg.loss_type == "dapo":
        return m * (ws / max(norm.num_tokens_global, 1))
    if cfg.loss_type == "dr_grpo":
        return m * (ws / (max(norm.num_sequences, 1) * cfg.max_completion_length))
    raise ValueError(f"unknown loss_type {cfg.loss_type!r}")


def mean_stat(x: Tensor, m: Tensor) -> Stat:
    """The mean of ``x`` over the tokens where ``m`` is 1, as a combinable ``Stat``."""
    return Stat((x * m).sum(), m.sum(), "mean")


def _extreme_stat(x: Tensor, mb: Tensor, reduce: Reduce) -> Stat:
    fill = math.inf if reduce == "min" else -math.inf
    if x.numel() == 0:  # an empty micro-batch (min/max of nothing would raise)
        return Stat(x.new_tensor(fill), x.new_zeros(()), reduce)
    masked = torch.where(mb, x, torch.full_like(x, fill))
    value = masked.min() if reduce == "min" else masked.max()
    return Stat(value, mb.sum().to(x.dtype), reduce)


def grpo_loss(
    logp: Tensor,
    behaviour_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    norm: Normalizer,
    *,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
) -> LossOutput:
    """The clipped GRPO objective of one micro-batch, scaled for summation over the step.

    Args:
        logp: ``[B, T]`` log-probabilities of the sampled tokens under the current policy
            (with grad).
        behaviour_logp: ``[B, T]`` the sampling log-probabilities the inference server
            returned for the same tokens (the behaviour policy).
        advantages: ``[B]`` one advantage per completion.
        mask: ``[B, T]`` 1 (or True) for tokens trained on, 0 for padding / masked tokens.
        cfg: loss options.
        norm: step-batch totals that fix the aggregation constants.
        old_logp: ``[B, T]`` the trainer's own log-probabilities computed once at the start
            of the iteration (no grad). When given, the importance ratio is taken against it
            instead of ``behaviour_logp`` (PPO's pi_old); ``tis_cap`` requires it, since the
            TIS weight is ``pi_old / pi_behaviour``.
        ref_logp: ``[B, T]`` reference-policy log-probabilities; required when
            ``cfg.kl_coef > 0``; when given with ``kl_coef == 0`` only the KL metric is
            computed.
        entropy: ``[B, T]`` per-position entropies (with grad if ``entropy_coef != 0``);
            required when ``cfg.entropy_coef != 0``.

    Returns:
        :class:`LossOutput`. Stats (token-weighted over masked tokens unless noted):
        ``loss/policy``, ``loss/kl``, ``loss/entropy`` ("sum": each part's contribution to
        ``loss``, so they add up to it); ``ratio/mean``, ``ratio/min``, ``ratio/max``;
        ``clip/low_frac`` (ratio < 1 - eps_low with A < 0), ``clip/high_frac`` (ratio >
        1 + eps_high with A > 0), ``clip/frac`` (either: the tokens whose gradient the clip
        removes; TRL's definitions); ``kl/mean`` (when ``ref_logp`` is given);
        ``entropy/mean`` (when ``entropy`` is given); ``tis/weight_mean`` and
        ``tis/truncated_frac`` (with ``tis_cap``); ``mismatch/abs_mean`` and
        ``mismatch/abs_max``: ``|trainer - behaviour|`` log-probabilities, the trainer's being
        ``old_logp`` if given, else ``logp`` (exactly the trainer's old policy on the first
        pass over a batch); ``tokens`` ("sum").
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got {tuple(logp.shape)}")
    for name, x in (("behaviour_logp", behaviour_logp), ("mask", mask), ("old_logp", old_logp),
                    ("ref_logp", ref_logp), ("entropy", entropy)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(x.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if cfg.tis_cap is not None and old_logp is None:
        raise ValueError("tis_cap is set but old_logp was not given (the TIS weight is pi_old / pi_behaviour)")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 but ref_logp was not given")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 but entropy was not given")

    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.to(dtype)
    mb = mask.bool()
    # Sequences are padded to a common T: garbage at masked positions (e.g. -inf from a server
    # or 0 from padding) must not reach exp() and produce inf * 0 = nan in the gradient.
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    logp = torch.where(mb, logp.to(dtype), zero)
    behaviour = torch.where(mb, behaviour_logp.detach().to(dtype), zero)
    old = torch.where(mb, old_logp.detach().to(dtype), zero) if old_logp is not None else None
    base = old if old is not None else behaviour
    adv = advantages.detach().to(dtype)[:, None]

    log_ratio = torch.where(mb, logp - base, zero)
    if cfg.importance_level == "sequence":
        # GSPO-token: the value is the sequence's mean log-ratio s_i, the gradient that of
        # each token's own logp (scaled by exp(s_i) below), i.e. the sequence-level gradient.
        seq = log_ratio.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        log_ratio = seq.detach() + (logp - logp.detach())
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    per_token_pg = -torch.minimum(ratio * adv, clipped * adv)

    tis_w = tis_raw = None
    if cfg.tis_cap is not None:
        assert old is not None  # checked above
        tis_raw = torch.exp(old - behaviour)
        tis_w = tis_raw.clamp(max=cfg.tis_cap)
        per_token_pg = per_token_pg * tis_w

    weights = aggregation_weights(mb, cfg, norm, dtype)
    policy_part = (weights * per_token_pg).sum()
    loss = policy_part

    kl = None
    kl_part = zero
    if ref_logp is not None:
        ref = torch.where(mb, ref_logp.detach().to(dtype), zero)
        kl = torch.where(mb, kl_estimate(logp, ref, cfg.kl_estimator), zero)
        if cfg.kl_coef > 0:
            kl_part = cfg.kl_coef * (weights * kl).sum()
            loss = loss + kl_part

    ent_part = zero
    if entropy is not None:
        entropy = torch.where(mb, entropy.to(dtype), zero)
        if cfg.entropy_coef != 0:
            ent_part = -cfg.entropy_coef * (weights * entropy).sum()
            loss = loss + ent_part

    with torch.no_grad():
        r = ratio.detach()
        low = ((r < 1.0 - cfg.epsilon_low) & (adv < 0)).to(dtype)
        high = ((r > 1.0 + cfg.epsilon_high) & (adv > 0)).to(dtype)
        trainer = old if old is not None else logp.detach()
        mismatch = (trainer - behaviour).abs()
        n_tok = m.sum()
        stats: dict[str, Stat] = {
            "loss/policy": Stat(policy_part.detach(), n_tok, "sum"),
            "loss/kl": Stat(kl_part.detach(), n_tok, "sum"),
            "loss/entropy": Stat(ent_part.detach(), n_tok, "sum"),
            "ratio/mean": mean_stat(r, m),
            "ratio/min": _extreme_stat(r, mb, "min"),
            "ratio/max": _extreme_stat(r, mb, "max"),
            "clip/low_frac": mean_stat(low, m),
            "clip/high_frac": mean_stat(high, m),
            "clip/frac": mean_stat(low + high, m),
            "mismatch/abs_mean": mean_stat(mismatch, m),
            "mismatch/abs_max": _extreme_stat(mismatch, mb, "max"),
            "tokens": Stat(n_tok, n_tok, "sum"),
        }
        if kl is not None:
            stats["kl/mean"] = mean_stat(kl.detach(), m)
        if entropy is not None:
            stats["entropy/mean"] = mean_stat(entropy.detach(), m)
        if tis_w is not None and tis_raw is not None:
            stats["tis/weight_mean"] = mean_stat(tis_w, m)
            stats["tis/truncated_frac"] = mean_stat((tis_raw > cfg.tis_cap).to(dtype), m)
    return LossOutput(loss=loss, stats=stats)


def combine_stats(parts: Iterable[Mapping[str, Stat]]) -> dict[str, Stat]:
    """Merge stats of several micro-batches (sums add, extremes take min/max)."""
    out: dict[str, Stat] = {}
    for part in parts:
        for name, s in part.items():
            prev = out.get(name)
            if prev is None:
                out[name] = s
                continue
            if prev.reduce != s.reduce:
                raise ValueError(f"stat {name!r} reduced as {prev.reduce} and {s.reduce}")
            if s.reduce in ("mean", "sum"):
                value = prev.value + s.value
            elif s.reduce == "min":
                value = torch.minimum(prev.value, s.value)
            else:
                value = torch.maximum(prev.value, s.value)
            out[name] = Stat(value, prev.count + s.count, s.reduce)
    return out


def finalize_stats(stats: Mapping[str, Stat]) -> dict[str, float]:
    """Python floats: means divide by their count (nan when the count is 0)."""
    out: dict[str, float] = {}
    for name, s in stats.items():
        if s.reduce == "mean":
            count = float(s.count)
            out[name] = float(s.value) / count if count > 0 else math.nan
        else:
            out[name] = float(s.value) if float(s.count) > 0 or s.reduce == "sum" else math.nan
    return out
