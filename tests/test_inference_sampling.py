"""The sampling distribution (temperature, top-k, top-p) and per-row seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lightning.inference.sampling import draw, make_generator, processed_logprobs


def reference(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Plain-Python processed distribution: temperature, then top-k, then top-p."""
    t = 1.0 if temperature == 0 else temperature
    scaled = [x / t for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order[: top_k or len(order)])
    if temperature > 0 and top_p < 1:
        z = sum(math.exp(scaled[i]) for i in keep)
        mass, kept = 0.0, set()
        for i in order:
            if i not in keep or mass >= top_p:
                break
            kept.add(i)
            mass += math.exp(scaled[i]) / z
        keep = kept
    if temperature == 0:
        keep = set(range(len(scaled)))
    z = math.log(sum(math.exp(scaled[i]) for i in keep))
    return [scaled[i] - z if i in keep else -math.inf for i in range(len(scaled))]


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.0, 3, 1.0),
        (1.0, 0, 0.6),
        (1.5, 4, 0.8),
        (0.0, 2, 0.5),
        (1.0, 50, 1.0),
    ],
)
def test_processed_logprobs_match_reference(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=gen) * 2
    rows = len(logits)
    out = processed_logprobs(
        logits,
        torch.full((rows,), temperature),
        torch.full((rows,), top_k, dtype=torch.long),
        torch.full((rows,), top_p),
    )
    for r in range(rows):
        want = reference(logits[r].tolist(), temperature, top_k, top_p)
        for got, exp in zip(out[r].tolist(), want, strict=True):
            assert (got == exp == -math.inf) or abs(got - exp) < 1e-5


def test_rows_keep_their_own_settings_and_banned_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    out = processed_logprobs(
        logits,
        torch.tensor([1.0, 0.5, 1.0]),
        torch.tensor([0, 0, 1]),
        torch.tensor([1.0, 1.0, 1.0]),
        banned=torch.tensor([[True, False, False, False], [False] * 4, [False] * 4]),
    )
    assert out[0, 0] == -math.inf and torch.isfinite(out[0, 1:]).all()
    assert torch.allclose(out[1], torch.log_softmax(logits[1] / 0.5, -1))
    assert out[2].tolist() == [0.0, -math.inf, -math.inf, -math.inf]


def test_draws_are_reproducible_per_row_and_follow_the_distribution():
    logprobs = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0]] * 2), -1)
    greedy = torch.tensor([False, True])

    def run(seed: int, steps: int) -> list[list[int]]:
        gens = [
            make_generator(seed, torch.device("cpu")),
            make_generator(seed + 1, torch.device("cpu")),
        ]
        return [draw(logprobs, greedy, gens).tolist() for _ in range(steps)]

    first = run(7, 2000)
    assert first == run(7, 2000)
    assert all(row[1] == 2 for row in first)  # greedy row: argmax
    freq = [sum(row[0] == k for row in first) / len(first) for k in range(3)]
    assert freq == pytest.approx(logprobs[0].exp().tolist(), abs=0.04)


def test_draw_never_picks_a_zero_probability_token():
    logprobs = torch.log(torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]))
    gens = [make_generator(3, torch.device("cpu"))]
    picks = {int(draw(logprobs, torch.tensor([False]), gens)) for _ in range(300)}
    assert picks == {1, 3}


def test_generator_seeds_wrap_instead_of_overflowing():
    a = torch.rand(3, generator=make_generator(2**64 + 5, torch.device("cpu")))
    b = torch.rand(3, generator=make_generator(5, torch.device("cpu")))
    assert torch.equal(a, b)
    torch.rand(1, generator=make_generator(-(2**63), torch.device("cpu")))
