"""Token-budget micro-batch planning."""

from __future__ import annotations

import random

import pytest

from grpo_lightning.packing import padding_fraction, plan_micro_batches


def skewed_lengths(n: int = 128, seed: int = 0) -> list[int]:
    """Prompt ~100-250 tokens plus a completion of 10-40 tokens with a long tail to 512."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        completion = rng.randint(10, 40) if rng.random() < 0.85 else rng.randint(100, 512)
        out.append(rng.randint(100, 250) + completion)
    return out


def _flat(plan: list[list[int]]) -> list[int]:
    return sorted(i for mb in plan for i in mb)


@pytest.mark.parametrize("budget", [300, 1000, 2048, 4096, 100_000])
@pytest.mark.parametrize("cap", [None, 4, 16])
def test_budget_plan_covers_each_index_once_and_respects_budget(budget: int, cap: int | None) -> None:
    lengths = skewed_lengths()
    plan = plan_micro_batches(lengths, micro_batch_size=cap, max_tokens_per_micro_batch=budget)
    assert _flat(plan) == list(range(len(lengths)))
    for mb in plan:
        assert mb, "no empty micro-batches"
        width = max(lengths[i] for i in mb)
        if width > budget:
            assert len(mb) == 1  # a longer-than-budget sequence is alone
        else:
            assert len(mb) * width <= budget
        if cap is not None:
            assert len(mb) <= cap


def test_packing_pads_less_than_fixed_micro_batches() -> None:
    lengths = skewed_lengths()
    fixed = plan_micro_batches(lengths, micro_batch_size=8)
    packed = plan_micro_batches(lengths, max_tokens_per_micro_batch=8 * 300)
    pf_fixed, pf_packed = padding_fraction(lengths, fixed), padding_fraction(lengths, packed)
    assert pf_packed < 0.10 < pf_fixed
    assert pf_packed < pf_fixed / 2


def test_fixed_size_plan_keeps_order() -> None:
    assert plan_micro_batches([5, 1, 2, 3, 4], micro_batch_size=2) == [[0, 1], [2, 3], [4]]
    assert plan_micro_batches([], micro_batch_size=2) == []


def test_small_example_and_determinism() -> None:
    """Lengths 10, 3, 9, 2, 4, budget 20, longest first:
    10 -> bin A (width 10); 9 -> A would cost 10*2 = 20 <= 20: A = [0, 2];
    4 -> A full (10*3 > 20), new bin B (width 4); 3 -> B (4*2); 2 -> B (4*3 = 12)."""
    lengths = [10, 3, 9, 2, 4]
    plan = plan_micro_batches(lengths, max_tokens_per_micro_batch=20)
    assert plan == [[0, 2], [4, 1, 3]]
    assert plan == plan_micro_batches(lengths, max_tokens_per_micro_batch=20)
    # slots 2*10 + 3*4 = 32, real 28: padding 4 / 32
    assert padding_fraction(lengths, plan) == pytest.approx(4 / 32)
    # Ties broken by index.
    assert plan_micro_batches([5, 5, 5], max_tokens_per_micro_batch=10) == [[0, 1], [2]]


def test_oversized_sequence_alone() -> None:
    plan = plan_micro_batches([50, 3, 3], max_tokens_per_micro_batch=10)
    assert plan == [[0], [1, 2]]


def test_errors() -> None:
    with pytest.raises(ValueError):
        plan_micro_batches([1, 2])
    with pytest.raises(ValueError):
        plan_micro_batches([1, 2], max_tokens_per_micro_batch=0)
    with pytest.raises(ValueError):
        plan_micro_batches([1, 2], micro_batch_size=0)
    with pytest.raises(ValueError):
        plan_micro_batches([-1], micro_batch_size=1)
    assert padding_fraction([], []) == 0.0
