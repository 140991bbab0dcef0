"""The GRPO objective: hand-computed values, clipping gradients, KL, TIS, micro-batch invariance."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lightning.loss import (
    LossConfig,
    Normalizer,
    combine_stats,
    finalize_stats,
    grpo_loss,
    kl_estimate,
    loglinear_proximal,
    proximal_alpha,
)

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LEVELS = ["token", "sequence"]


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sequences of 3 completion positions; the second has 2 real tokens.

    behaviour logp = log 0.5 everywhere; ratios r = exp(logp - behaviour):
      seq 0 (A = +1.0):  r = 1.2, 1.5, 0.8
      seq 1 (A = -0.5):  r = 0.8, 0.45, [5.0 at the masked position: must be ignored]
    """
    behaviour = torch.full((2, 3), math.log(0.5), dtype=torch.float64)
    ratios = torch.tensor([[1.2, 1.5, 0.8], [0.8, 0.45, 5.0]], dtype=torch.float64)
    logp = (behaviour + ratios.log()).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    return logp, behaviour, adv, mask


# Hand computation with eps_low = 0.2, eps_high = 0.28 (clip range [0.8, 1.28]),
# per-token policy loss -min(r A, clip(r) A):
#
# token level
#   seq 0, A = 1:    r = 1.2 -> -1.2;  r = 1.5 -> clip 1.28 -> -1.28;  r = 0.8 -> -0.8
#                    sum -3.28 over 3 tokens
#   seq 1, A = -0.5: r = 0.8 -> min(-0.4, -0.4) -> +0.4;  r = 0.45 -> min(-0.225, 0.8 * -0.5 = -0.4)
#                    -> +0.4;  sum 0.8 over 2 tokens
#   grpo    = (-3.28 / 3 + 0.8 / 2) / 2 = (-1.0933333 + 0.4) / 2 = -0.3466667
#   bnpo    = dapo = (-3.28 + 0.8) / 5 = -0.496
#   dr_grpo = -2.48 / (2 sequences * max_completion_length 4) = -0.31
#
# sequence level (GSPO): s = geometric mean of the ratios
#   seq 0: (1.2 * 1.5 * 0.8)^(1/3) = 1.44^(1/3) = 1.1292432 (in range) -> -1.1292432 per token
#   seq 1: (0.8 * 0.45)^(1/2) = 0.36^(1/2) = 0.6 -> min(-0.3, -0.4) -> +0.4 per token
#   grpo    = (-1.1292432 + 0.4) / 2 = -0.3646216
#   bnpo    = dapo = (3 * -1.1292432 + 2 * 0.4) / 5 = -2.5877297 / 5 = -0.5175459
#   dr_grpo = -2.5877297 / 8 = -0.3234662
EXPECTED = {
    ("token", "grpo"): -0.3466667,
    ("token", "bnpo"): -0.496,
    ("token", "dapo"): -0.496,
    ("token", "dr_grpo"): -0.31,
    ("sequence", "grpo"): -0.3646216,
    ("sequence", "bnpo"): -0.5175459,
    ("sequence", "dapo"): -0.5175459,
    ("sequence", "dr_grpo"): -0.3234662,
}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_hand_computed_values(loss_type: str, level: str) -> None:
    logp, behaviour, adv, mask = tiny_batch()
    cfg = LossConfig(loss_type=loss_type, importance_level=level, max_completion_length=4)  # type: ignore[arg-type]
    out = grpo_loss(logp, behaviour, adv, mask, cfg, Normalizer.from_mask(mask))
    assert out.loss.item() == pytest.approx(EXPECTED[(level, loss_type)], abs=1e-6)
    # Two ranks, each holding this same batch: global totals double, and DDP's average of the
    # two identical rank losses must be the same objective (hence the world_size factor).
    norm2 = Normalizer(num_sequences=4, num_tokens_local=5, num_tokens_global=10, world_size=2)
    out2 = grpo_loss(logp, behaviour, adv, mask, cfg, norm2)
    assert out2.loss.item() == pytest.approx(EXPECTED[(level, loss_type)], abs=1e-6)
    stats = finalize_stats(out.stats)
    assert stats["loss/policy"] == pytest.approx(out.loss.item())
    assert stats["tokens"] == 5


def test_ratio_and_clip_stats_token_level() -> None:
    """Tokens: r = 1.2, 1.5 (A>0: high clip), 0.8, 0.8 (boundary: not clipped), 0.45 (A<0: low clip)."""
    logp, behaviour, adv, mask = tiny_batch()
    out = grpo_loss(logp, behaviour, adv, mask, LossConfig(), Normalizer.from_mask(mask))
    s = finalize_stats(out.stats)
    assert s["ratio/mean"] == pytest.approx((1.2 + 1.5 + 0.8 + 0.8 + 0.45) / 5)
    assert s["ratio/min"] == pytest.approx(0.45) and s["ratio/max"] == pytest.approx(1.5)
    assert s["clip/high_frac"] == pytest.approx(1 / 5)
    assert s["clip/low_frac"] == pytest.approx(1 / 5)
    assert s["clip/frac"] == pytest.approx(2 / 5)
    # logp is the trainer's logp here (no old_logp): |log r| per token.
    mism = [abs(math.log(r)) for r in (1.2, 1.5, 0.8, 0.8, 0.45)]
    assert s["mismatch/abs_mean"] == pytest.approx(sum(mism) / 5)
    assert s["mismatch/abs_max"] == pytest.approx(max(mism))


def _grad_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ratios away from the clip boundaries: seq 0 A = +1, seq 1 A = -1.

    seq 0: 1.1 (in range), 1.5 (> 1.28, A > 0: clipped), 0.7 (< 0.8 but A > 0: not clipped)
    seq 1: 0.9 (in range), 0.5 (< 0.8, A < 0: clipped), 1.3 (> 1.28 but A < 0: not clipped)
    """
    behaviour = torch.full((2, 3), -1.0, dtype=torch.float64)
    ratios = torch.tensor([[1.1, 1.5, 0.7], [0.9, 0.5, 1.3]], dtype=torch.float64)
    logp = (behaviour + ratios.log()).requires_grad_()
    return logp, behaviour, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_zero_exactly_where_clip_active(loss_type: str) -> None:
    logp, behaviour, adv, mask = _grad_batch()
    cfg = LossConfig(loss_type=loss_type, max_completion_length=3)  # type: ignore[arg-type]
    grpo_loss(logp, behaviour, adv, mask, cfg, Normalizer.from_mask(mask)).loss.backward()
    g = logp.grad
    assert g is not None
    active = torch.tensor([[False, True, False], [False, True, False]])
    assert torch.all(g[active] == 0)
    assert torch.all(g[~active] != 0)
    # Unclipped: d(-r A)/d logp = -r A, times the aggregation weight (1/6 for every type here:
    # grpo 1/(3*2), bnpo/dapo 1/6 tokens, dr_grpo 1/(2*3)).
    expected = torch.tensor([[-1.1, 0.0, -0.7], [0.9, 0.0, 1.3]], dtype=torch.float64) / 6
    assert torch.allclose(g, expected)


def test_sequence_level_gradient_matches_gspo() -> None:
    """GSPO-token form gives GSPO's gradient: compare with the direct sequence objective
    -1/B sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log r_it), under grpo aggregation."""
    torch.manual_seed(0)
    b, t = 4, 5
    behaviour = -torch.rand(b, t, dtype=torch.float64) * 3
    logp0 = behaviour + 0.15 * torch.randn(b, t, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3], dtype=torch.float64)
    cfg = LossConfig(loss_type="grpo", importance_level="sequence", epsilon_low=0.05, epsilon_high=0.05)
    logp = logp0.clone().requires_grad_()
    out = grpo_loss(logp, behaviour, adv, mask, cfg, Normalizer.from_mask(mask))
    out.loss.backward()
    ref = logp0.clone().requires_grad_()
    s = torch.exp(((ref - behaviour) * mask).sum(1) / mask.sum(1))
    direct = -torch.minimum(s * adv, s.clamp(0.95, 1.05) * adv).mean()
    direct.backward()
    assert out.loss.item() == pytest.approx(direct.item(), abs=1e-12)
    assert logp.grad is not None and ref.grad is not None
    assert torch.allclose(logp.grad, ref.grad, atol=1e-12)
    assert (s < 0.95).any() or (s > 1.05).any()  # the batch exercises the clip too


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_equal_groups_give_zero_gradient(loss_type: str, level: str) -> None:
    logp, behaviour, _, mask = tiny_batch()
    cfg = LossConfig(loss_type=loss_type, importance_level=level)  # type: ignore[arg-type]
    out = grpo_loss(logp, behaviour, torch.zeros(2, dtype=torch.float64), mask, cfg, Normalizer.from_mask(mask))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert logp.grad is not None and torch.all(logp.grad == 0)


def test_kl_estimator_values() -> None:
    """p = 0.5, p_ref = 0.25: d = log(0.25 / 0.5) = -log 2.
    k1 = log 2 = 0.6931472; k2 = (log 2)^2 / 2 = 0.2402265; k3 = e^d - d - 1 = 0.5 + 0.6931472 - 1 = 0.1931472.
    """
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.6931472)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.2402265)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.1931472)
    same = torch.tensor([-1.3, -0.2])
    for est in ("k1", "k2", "k3"):
        assert torch.all(kl_estimate(same, same, est) == 0)  # type: ignore[arg-type]
    # k3 is non-negative everywhere (k1 is not).
    x, y = torch.randn(1000), torch.randn(1000)
    assert torch.all(kl_estimate(x, y, "k3") >= 0) and torch.any(kl_estimate(x, y, "k1") < 0)


@pytest.mark.parametrize(("est", "value", "grad"), [
    # d/dlogp: k1 -> 1; k2 -> -(ref - logp) = log 2; k3 -> 1 - exp(ref - logp) = 0.5
    ("k1", 0.6931472, 1.0),
    ("k2", 0.2402265, 0.6931472),
    ("k3", 0.1931472, 0.5),
])
def test_kl_in_loss(est: str, value: float, grad: float) -> None:
    """One sequence, 2 tokens, logp = behaviour (r = 1), A = 0: loss = kl_coef * mean_t k."""
    logp = torch.full((1, 2), math.log(0.5), dtype=torch.float64, requires_grad=True)
    ref = torch.full((1, 2), math.log(0.25), dtype=torch.float64)
    mask = torch.ones(1, 2)
    cfg = LossConfig(kl_coef=0.1, kl_estimator=est)  # type: ignore[arg-type]
    out = grpo_loss(logp, logp.detach(), torch.zeros(1), mask, cfg, Normalizer.from_mask(mask), ref_logp=ref)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.1 * value)
    assert logp.grad is not None and torch.allclose(logp.grad, torch.full((1, 2), 0.1 * grad / 2, dtype=torch.float64))
    s = finalize_stats(out.stats)
    assert s["kl/mean"] == pytest.approx(value) and s["loss/kl"] == pytest.approx(0.1 * value)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp.detach(), torch.zeros(1), mask, cfg, Normalizer.from_mask(mask))


def test_entropy_bonus() -> None:
    """A = 0, entropies 1.0 and 2.0, coef 0.01, dapo over 2 tokens: loss = -0.01 * 1.5 = -0.015."""
    logp = torch.zeros(1, 2, requires_grad=True)
    ent = torch.tensor([[1.0, 2.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    cfg = LossConfig(entropy_coef=0.01)
    out = grpo_loss(logp, logp.detach(), torch.zeros(1), mask, cfg, Normalizer.from_mask(mask), entropy=ent)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.015)
    assert ent.grad is not None and torch.allclose(ent.grad, torch.full((1, 2), -0.005))
    assert finalize_stats(out.stats)["entropy/mean"] == pytest.approx(1.5)


def test_truncated_importance_sampling() -> None:
    """old - behaviour = log 3, log 0.5 -> TIS weights min(3, 2) = 2 (truncated), 0.5.

    logp = old (ratio 1 against old_logp, not against behaviour), A = 1:
    per-token policy loss -1 * weight -> -2, -0.5; dapo over 2 tokens: -1.25.
    Without TIS the same batch gives -1.0 (ratio against old) .
    """
    behaviour = torch.full((1, 2), -2.0, dtype=torch.float64)
    old = behaviour + torch.tensor([[math.log(3.0), math.log(0.5)]], dtype=torch.float64)
    logp = old.clone().requires_grad_()
    mask = torch.ones(1, 2)
    adv = torch.ones(1, dtype=torch.float64)
    norm = Normalizer.from_mask(mask)
    out = grpo_loss(logp, behaviour, adv, mask, LossConfig(tis_cap=2.0), norm, old_logp=old)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.25)
    assert logp.grad is not None and torch.allclose(logp.grad, torch.tensor([[-1.0, -0.25]], dtype=torch.float64))
    s = finalize_stats(out.stats)
    assert s["tis/weight_mean"] == pytest.approx(1.25)
    assert s["tis/truncated_frac"] == pytest.approx(0.5)
    assert s["ratio/mean"] == pytest.approx(1.0)
    assert s["mismatch/abs_mean"] == pytest.approx((math.log(3) + math.log(2)) / 2)
    assert s["mismatch/abs_max"] == pytest.approx(math.log(3))
    no_tis = grpo_loss(logp, behaviour, adv, mask, LossConfig(), norm, old_logp=old)
    assert no_tis.loss.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        grpo_loss(logp, behaviour, adv, mask, LossConfig(tis_cap=2.0), norm)


def test_proximal_alpha_counts_optimizer_steps() -> None:
    """alpha = (v_prox - v_behave) / (v_theta - v_behave), versions in optimizer steps.

    Rollouts 32 steps old (one iteration of 4 passes x 8 steps at max_staleness 1) and of the
    iteration's own policy (0 steps): at step 0 every alpha is 1 (current = proximal); at step
    8, 32 / 40 = 0.8 and 0; at step 31, 32 / 63; 64 steps behind at step 16: 64 / 80 = 0.8.
    """
    behind = torch.tensor([32, 0, 64])
    assert proximal_alpha(behind, 0).tolist() == [1.0, 1.0, 1.0]
    assert proximal_alpha(behind, 8).tolist() == pytest.approx([0.8, 0.0, 64 / 72])
    assert proximal_alpha(behind, 31).tolist() == pytest.approx([32 / 63, 0.0, 64 / 95])
    assert proximal_alpha(behind, 16).tolist() == pytest.approx([2 / 3, 0.0, 0.8])


def test_loglinear_proximal_hand_computed() -> None:
    """log pi_prox = behave + alpha (current - behave), no gradient, zeros outside the mask.

    Row 0: behave -2, current -1, alpha 0.25 -> -1.75; row 1: behave -3 (-inf at the masked
    position: must not turn into nan), current -2, alpha 0 -> -3 (the behaviour policy).
    Against it the TIS weight of row 0 is exp(0.25) (capped at 2 unchanged) and the ratio
    exp(-1 + 1.75) = exp(0.75), clipped to 1.28 for A = +1: loss -1.28 * exp(0.25) per token.
    """
    behaviour = torch.tensor([[-2.0, -2.0], [-3.0, -math.inf]], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -1.0], [-2.0, 5.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    prox = loglinear_proximal(logp, behaviour, mask, torch.tensor([0.25, 0.0]))
    assert not prox.requires_grad
    assert prox.tolist() == [[-1.75, -1.75], [-3.0, 0.0]]
    adv = torch.tensor([1.0, 0.0], dtype=torch.float64)
    norm = Normalizer.from_mask(mask)
    out = grpo_loss(logp, behaviour, adv, mask, LossConfig(tis_cap=2.0), norm, old_logp=prox)
    assert out.loss.item() == pytest.approx(2 * -1.28 * math.exp(0.25) / 3)
    assert finalize_stats(out.stats)["tis/weight_mean"] == pytest.approx((2 * math.exp(0.25) + 1) / 3)


def _random_step_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, t = 8, 7
    lengths = torch.tensor([7, 1, 3, 6, 2, 7, 4, 5])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    behaviour = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    old = behaviour + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    logp = old + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    adv[2] = 0.0
    return logp, behaviour, old, ref, ent, adv, mask, lengths


SPLITS = [
    [[0, 1, 2, 3, 4, 5, 6, 7]],
    [[0, 1, 2], [3, 4, 5, 6, 7]],
    [[5, 2], [7, 0, 3], [1, 6, 4]],  # reordered, as a token-budget plan would
    [[i] for i in range(8)],
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_split_invariance(loss_type: str, level: str) -> None:
    """Summing micro-batch losses gives the same loss and gradient for every split, with every
    micro-batch trimmed to its own longest sequence (different T per micro-batch)."""
    logp0, behaviour, old, ref, ent0, adv, mask, lengths = _random_step_batch()
    cfg = LossConfig(loss_type=loss_type, importance_level=level, kl_coef=0.05,  # type: ignore[arg-type]
                     entropy_coef=0.01, tis_cap=1.05, max_completion_length=7)
    norm = Normalizer.from_mask(mask)
    results = []
    for split in SPLITS:
        logp = logp0.clone().requires_grad_()
        ent = ent0.clone().requires_grad_()
        total = torch.zeros((), dtype=torch.float64)
        parts = []
        for mb in split:
            idx = torch.tensor(mb)
            width = int(lengths[idx].max())
            out = grpo_loss(logp[idx, :width], behaviour[idx, :width], adv[idx], mask[idx, :width], cfg, norm,
                            old_logp=old[idx, :width], ref_logp=ref[idx, :width], entropy=ent[idx, :width])
            total = total + out.loss
            parts.append(out.stats)
        total.backward()
        assert logp.grad is not None and ent.grad is not None
        results.append((total.detach(), logp.grad, ent.grad, finalize_stats(combine_stats(parts))))
    loss_ref, g_ref, ge_ref, stats_ref = results[0]
    assert g_ref.abs().sum() > 0
    for loss, g, ge, stats in results[1:]:
        assert torch.allclose(loss, loss_ref, atol=1e-12)
        assert torch.allclose(g, g_ref, atol=1e-12)
        assert torch.allclose(ge, ge_ref, atol=1e-12)
        for k, v in stats_ref.items():
            assert stats[k] == pytest.approx(v, abs=1e-12), k


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_ddp_average_over_ranks_equals_single_process(loss_type: str) -> None:
    """Two ranks with global normalisers; DDP averages their gradients: same as one process."""
    logp0, behaviour, _, _, _, adv, mask, _ = _random_step_batch(1)
    cfg = LossConfig(loss_type=loss_type, max_completion_length=7)  # type: ignore[arg-type]
    single = logp0.clone().requires_grad_()
    grpo_loss(single, behaviour, adv, mask, cfg, Normalizer.from_mask(mask)).loss.backward()
    ranks = [[0, 1, 2, 3], [4, 5, 6, 7]]
    logp = logp0.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for r in ranks:
        norm = Normalizer(num_sequences=8, num_tokens_local=int(mask[r].sum()),
                          num_tokens_global=int(mask.sum()), world_size=2)
        total = total + grpo_loss(logp[r], behaviour[r], adv[r], mask[r], cfg, norm).loss / 2  # DDP mean
    total.backward()
    assert single.grad is not None and logp.grad is not None
    assert torch.allclose(logp.grad, single.grad, atol=1e-12)


def test_masked_garbage_is_ignored() -> None:
    """-inf / nan at masked positions (e.g. a server's padding) must not leak into loss or grad."""
    logp, behaviour, adv, mask = tiny_batch()
    behaviour = behaviour.clone()
    behaviour[1, 2] = -math.inf
    logp2 = logp.detach().clone()
    logp2[1, 2] = math.nan
    logp2.requires_grad_()
    for level in LEVELS:
        cfg = LossConfig(importance_level=level, kl_coef=0.1)  # type: ignore[arg-type]
        out = grpo_loss(logp2, behaviour, adv, mask, cfg, Normalizer.from_mask(mask), ref_logp=behaviour,
                        old_logp=logp2.detach())
        out.loss.backward()
        assert torch.isfinite(out.loss) and logp2.grad is not None and torch.isfinite(logp2.grad).all()
        assert all(math.isfinite(v) for v in finalize_stats(out.stats).values())
        logp2.grad = None


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        LossConfig(loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LossConfig(epsilon_low=1.5)
    with pytest.raises(ValueError):
        LossConfig(tis_cap=0.0)
    with pytest.raises(ValueError, match=">= 1"):
        LossConfig(tis_cap=0.5)
    logp, behaviour, adv, mask = tiny_batch()
    with pytest.raises(ValueError):
        grpo_loss(logp, behaviour, adv, mask, LossConfig(entropy_coef=0.1), Normalizer.from_mask(mask))


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_empty_micro_batch(shape: tuple[int, int]) -> None:
    """An empty micro-batch (a rank with nothing left in a step) contributes exactly 0."""
    logp = torch.zeros(shape, requires_grad=True)
    mask = torch.ones(shape)
    norm = Normalizer(num_sequences=4, num_tokens_local=10, num_tokens_global=10)
    for level in LEVELS:
        cfg = LossConfig(importance_level=level, kl_coef=0.1, entropy_coef=0.1, tis_cap=2.0)  # type: ignore[arg-type]
        out = grpo_loss(logp, logp.detach(), torch.zeros(shape[0]), mask, cfg, norm,
                        old_logp=logp.detach(), ref_logp=logp.detach(), entropy=logp)
        out.loss.backward()
        assert out.loss.item() == 0.0
        stats = finalize_stats(out.stats)
        assert stats["tokens"] == 0 and math.isnan(stats["ratio/mean"]) and math.isnan(stats["ratio/max"])
