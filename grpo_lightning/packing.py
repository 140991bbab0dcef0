"""Token-budget micro-batches: group sequences of similar length so little compute is padding.

GRPO rollouts have very uneven lengths (a long tail of completions that run to the limit),
and a fixed ``micro_batch_size`` pads every sequence of a micro-batch to its longest one.
Sorting by length and filling micro-batches up to a token budget (verl's / OpenRLHF's dynamic
batch size) keeps the padded fraction low and the memory per micro-batch bounded, and the
number of micro-batches then varies. The gradient is unchanged because
:func:`grpo_lightning.loss.grpo_loss` normalises by step-batch totals, not per micro-batch.

The cost model is that of right-padded micro-batches: a micro-batch of ``k`` sequences costs
``k * max(lengths)`` token slots (attention's quadratic term is ignored).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["padding_fraction", "plan_micro_batches"]


def plan_micro_batches(
    lengths: Sequence[int],
    *,
    micro_batch_size: int | None = None,
    max_tokens_per_micro_batch: int | None = None,
) -> list[list[int]]:
    """Split sequence indices into micro-batches.

    Args:
        lengths: length (in tokens, padding excluded) of each sequence of the step batch.
        micro_batch_size: with no token budget, consecutive groups of this many indices in
            the original order (the unpacked path; the last group may be smaller). With a
            budget, an additional cap on sequences per micro-batch.
        max_tokens_per_micro_batch: token budget: every micro-batch satisfies
            ``len(mb) * max(lengths[mb]) <= budget``, except that a sequence longer than the
            budget gets a micro-batch of its own. Sequences are placed longest first, each
            into the first micro-batch that still fits it (first-fit decreasing), so
            micro-batches hold sequences of similar length.

    Returns:
        Lists of indices into ``lengths``; every index appears exactly once. Deterministic:
        ties in length are broken by index, and micro-batches come in the order they were
        opened (longest first), each listing its indices longest first.
    """
    n = len(lengths)
    if any(int(x) < 0 for x in lengths):
        raise ValueError("lengths must be non-negative")
    if micro_batch_size is not None and micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if max_tokens_per_micro_batch is None:
        if micro_batch_size is None:
            raise ValueError("give micro_batch_size, max_tokens_per_micro_batch, or both")
        return [list(range(s, min(s + micro_batch_size, n))) for s in range(0, n, micro_batch_size)]
    budget = int(max_tokens_per_micro_batch)
    if budget <= 0:
        raise ValueError(f"max_tokens_per_micro_batch must be positive, got {budget}")
    cap = micro_batch_size if micro_batch_size is not None else n
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    widths: list[int] = []  # the first (longest) length of each bin: its padded width
    for i in order:
        length = int(lengths[i])
        for b, members in enumerate(bins):
            # Placed in decreasing order, so the bin's width stays that of its first member.
            if len(members) < cap and widths[b] * (len(members) + 1) <= budget:
                members.append(i)
                break
        else:
            bins.append([i])
            widths.append(length)
    return bins


def padding_fraction(lengths: Sequence[int], plan: Sequence[Sequence[int]]) -> float:
    """Share of the token slots of ``plan`` (right-padded micro-batches) that are padding."""
    slots = sum(len(mb) * max((int(lengths[i]) for i in mb), default=0) for mb in plan)
    real = sum(int(lengths[i]) for mb in plan for i in mb)
    return 0.0 if slots == 0 else 1.0 - real / slots
