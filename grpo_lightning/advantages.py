"""Group-relative advantages (GRPO: DeepSeekMath, Shao et al. 2024).

Each prompt is sampled G times (a "group"); a completion's advantage is its reward minus the
mean reward of its group, optionally divided by a standard deviation:

* ``scale="group"``: divide by the population std of the group (GRPO as published).
* ``scale="batch"``: divide by the population std of all rewards in the batch (the more
  robust variant of TRL's ``scale_rewards="batch"``; a group with a tiny std is not blown up).
* ``scale="none"``: no division (Dr. GRPO, Liu et al. 2025 "Understanding R1-Zero-Like
  Training": the per-group std division biases updates towards questions that are too easy
  or too hard).

A group whose rewards are all equal carries no learning signal. Its advantages are set to
exactly 0.0 by an equality test on the rewards as given, not by testing ``std < eps``: with
float noise such as ``0.1 + 0.2`` vs ``0.3`` the centred rewards are ~1e-17 and dividing by
``std + eps`` would still give ~1e-13, while dividing by a std with no eps would give +-1
(a bug of the runner this project replaces). Consequently ``[0.1 + 0.2, 0.3]`` (which differ
in the last bit) is *not* treated as all-equal: it gets advantages of ~+-2.8e-13, far below
anything an optimizer step notices. Rewards that should compare equal should be computed the
same way (the environments do), or rounded by the caller.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]


def zero_std_groups(rewards: Tensor) -> Tensor:
    """Which groups have all-equal rewards (exact equality of the values as given).

    Args:
        rewards: ``[P, G]`` rewards, one row per prompt, one column per completion.

    Returns:
        ``[P]`` bool, True where every reward in the row equals the row's first reward.
        These groups are what TRL logs as ``frac_reward_zero_std`` and what verl/DAPO's
        dynamic sampling drops.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(
    rewards: Tensor, scale: AdvantageScale = "group", eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages ``A = (r - mean_group(r)) / (std + eps)``.

    Args:
        rewards: ``[P, G]`` rewards (any float dtype; the result has the same dtype).
        scale: what to divide the centred rewards by: ``"group"`` the population std of
            each group plus ``eps`` (GRPO, Shao et al. 2024); ``"batch"`` the population std
            of all ``P * G`` rewards plus ``eps``; ``"none"`` nothing (Dr. GRPO, Liu et al.
            2025).
        eps: added to the std so that small-but-nonzero spreads do not explode.

    Returns:
        ``[P, G]`` advantages; rows of all-equal rewards are exactly 0.0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = centred / (rewards.std(dim=1, keepdim=True, correction=0) + eps)
    elif scale == "batch":
        adv = centred / (rewards.std(correction=0) + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; use 'group', 'batch' or 'none'")
    # The mean of identical floats need not equal them bit for bit (summation rounding), so
    # the centred values can be ~1e-17 instead of 0: force exact zeros from the equality test.
    return torch.where(zero_std_groups(rewards)[:, None], torch.zeros_like(adv), adv)
