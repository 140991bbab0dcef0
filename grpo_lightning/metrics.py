"""Evaluation and rollout statistics as pure functions of rewards and successes."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, "Evaluating LLMs trained on code"): 1 - C(n-c, k)/C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def group_summary(rewards: Sequence[Sequence[float]], successes: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """Metrics over groups of replicates (one group per problem).

    pass@k, mean@k and best@k use the first k replicates of each problem for mean@k / best@k
    (mean and max reward) and the unbiased estimator over all n replicates for pass@k.
    """
    flat_r = [r for g in rewards for r in g]
    flat_s = [s for g in successes for s in g]
    out: dict[str, float] = {
        "reward_mean": _mean(flat_r),
        "reward_std": statistics.pstdev(flat_r) if len(flat_r) > 1 else 0.0,
        "success_rate": _mean([float(s) for s in flat_s]),
        "num_problems": float(len(rewards)),
        "num_completions": float(len(flat_r)),
    }
    n = min((len(g) for g in rewards), default=0)
    for k in ks:
        if not 0 < k <= n:
            continue
        out[f"pass@{k}"] = _mean([pass_at_k(len(s), sum(s), k) for s in successes])
        out[f"mean@{k}"] = _mean([_mean(list(g[:k])) for g in rewards])
        out[f"best@{k}"] = _mean([max(g[:k]) for g in rewards])
    return out


def all_equal(rewards: Sequence[float]) -> bool:
    """A group whose rewards are all equal: its advantages are 0, it carries no signal
    (``advantages.zero_std_groups`` is the same test on a tensor of groups)."""
    return len(set(rewards)) <= 1


def zero_std_fraction(rewards: Sequence[Sequence[float]]) -> float:
    """Share of groups whose rewards are all equal (they carry no policy-gradient signal)."""
    return _mean([float(all_equal(g)) for g in rewards])
