"""Group-relative advantages: values for each scale and exact zeros for all-equal groups."""

from __future__ import annotations

import pytest
import torch

from grpo_lightning.advantages import group_advantages, zero_std_groups


def test_group_scale_values() -> None:
    """Group [0, 1]: mean 0.5, population std 0.5, so A = +-0.5 / (0.5 + eps).

    Group [1, 2, 3, 6] (G=4 in a separate call): mean 3, deviations -2, -1, 0, 3,
    population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5) = 1.8708287.
    """
    adv = group_advantages(torch.tensor([[0.0, 1.0]]), "group", eps=1e-4)
    assert torch.allclose(adv, torch.tensor([[-0.5 / 0.5001, 0.5 / 0.5001]]))
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0]]), "group", eps=0.0)
    assert torch.allclose(adv, torch.tensor([[-2.0, -1.0, 0.0, 3.0]]) / 1.8708287)


def test_batch_and_none_scale_values() -> None:
    """Rewards [[0, 1], [0, 3]]: centred [[-0.5, 0.5], [-1.5, 1.5]].

    Batch population std of {0, 1, 0, 3}: mean 1, deviations -1, 0, -1, 2,
    variance (1 + 0 + 1 + 4) / 4 = 1.5, std = 1.2247449.
    """
    r = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    centred = torch.tensor([[-0.5, 0.5], [-1.5, 1.5]])
    assert torch.equal(group_advantages(r, "none"), centred)
    assert torch.allclose(group_advantages(r, "batch", eps=0.0), centred / 1.2247449)
    # Per-group scaling makes both groups +-1 (the spread differences are scaled away).
    assert torch.allclose(group_advantages(r, "group", eps=0.0), torch.tensor([[-1.0, 1.0]] * 2))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_groups_exactly_zero(scale: str) -> None:
    # 1.135 three times does not average back to 1.135 bit for bit in float32.
    r = torch.tensor([[1.135, 1.135, 1.135], [-0.2, 0.0, 1.0], [0.7, 0.7, 0.7]])
    adv = group_advantages(r, scale, eps=0.0 if scale != "group" else 1e-4)  # type: ignore[arg-type]
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[2], torch.zeros(3))
    assert adv[1].abs().sum() > 0
    assert zero_std_groups(r).tolist() == [True, False, True]


def test_float_noise_uses_equality_of_given_values() -> None:
    """Decision: "all equal" means equal as floats, as given.

    0.1 + 0.2 == 0.30000000000000004 (the same float) but != 0.3, so the group
    [0.1 + 0.2, 0.3, 0.30000000000000004] is not all-equal; its advantages are tiny
    (~1e-12, far from the O(1) values that dividing by the bare std gives), not exactly 0.
    A group of bit-identical values whose mean rounds differently is exactly 0.
    """
    noisy = torch.tensor([[0.1 + 0.2, 0.3, 0.30000000000000004]], dtype=torch.float64)
    assert not zero_std_groups(noisy).item()
    adv = group_advantages(noisy, "group")
    assert adv.abs().max() < 1e-11
    same = torch.tensor([[0.1 + 0.2] * 7], dtype=torch.float64)
    assert torch.equal(group_advantages(same, "group"), torch.zeros(1, 7, dtype=torch.float64))
    # The naive formula with no eps turns this 5e-17 noise into O(1) advantages (here 2.1).
    c = noisy - noisy.mean(dim=1, keepdim=True)
    assert float((c / c.std(correction=0)).abs().max()) > 0.5


def test_shapes_and_errors() -> None:
    r = torch.randn(4, 8)
    assert group_advantages(r).shape == (4, 8)
    assert torch.allclose(group_advantages(r).mean(dim=1), torch.zeros(4), atol=1e-6)
    assert group_advantages(torch.tensor([[1, 0]])).dtype == torch.float32  # ints upcast
    with pytest.raises(ValueError):
        group_advantages(torch.randn(8))
    with pytest.raises(ValueError):
        group_advantages(r, "bogus")  # type: ignore[arg-type]
