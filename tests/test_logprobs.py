"""Chunked fp32 log-probabilities: equal to the naive full log-softmax in values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from grpo_lightning.logprobs import (
    entropy_from_logits,
    selective_log_softmax,
    sequence_token_logprobs,
    shared_prompt_token_logprobs,
    token_logprobs,
)


def _naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    logits = (hidden.float() @ weight.float().t()) / temperature
    return selective_log_softmax(logits, targets), entropy_from_logits(logits)


@pytest.mark.parametrize(("temperature", "with_entropy", "chunk"), [(1.0, False, 1024), (0.7, True, 96), (1.3, True, 200)])
def test_matches_naive_fp32(temperature: float, with_entropy: bool, chunk: int) -> None:
    """N = 500 tokens, V = 32,000, H = 64: values and both gradients to 1e-5."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 500, 64, 32_000
    hidden = torch.randn(n, h, generator=g) * 0.3
    weight = torch.randn(v, h, generator=g) * 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = token_logprobs(h1, w1, targets, temperature, chunk, with_entropy)
    assert logp.dtype == torch.float32 and (ent is not None) == with_entropy
    obj = (logp * g_logp).sum() + ((ent * g_ent).sum() if ent is not None else 0.0)
    obj.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp2, ent2 = _naive(h2, w2, targets, temperature)
    obj2 = (logp2 * g_logp).sum() + ((ent2 * g_ent).sum() if with_entropy else 0.0)
    obj2.backward()

    torch.testing.assert_close(logp, logp2, rtol=1e-5, atol=1e-5)
    if ent is not None:
        torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(1)
    n, h, v = 7, 5, 11
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    for temperature, chunk in ((1.0, 3), (0.6, 4), (1.7, 100)):
        assert torch.autograd.gradcheck(
            lambda a, b, t=temperature, c=chunk: token_logprobs(a, b, targets, t, c, True), (hidden, weight)
        )
        assert torch.autograd.gradcheck(
            lambda a, b, t=temperature, c=chunk: token_logprobs(a, b, targets, t, c)[0], (hidden, weight)
        )
        # Entropy only (the logp output unused: its gradient arrives as None).
        assert torch.autograd.gradcheck(
            lambda a, b, t=temperature, c=chunk: token_logprobs(a, b, targets, t, c, True)[1], (hidden, weight)
        )


def test_bf16_under_autocast_computes_in_fp32() -> None:
    g = torch.Generator().manual_seed(2)
    n, h, v = 64, 32, 1000
    hidden = (torch.randn(n, h, generator=g) * 2).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 2).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = token_logprobs(hidden, weight, targets, 0.9, 16, True)
    assert logp.dtype == torch.float32 and ent is not None and ent.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16
    # Same numbers as the fp32 naive path on the upcast inputs: no bf16 rounding of logits.
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    logp2, ent2 = _naive(h32, w32, targets, 0.9)
    torch.testing.assert_close(logp, logp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)
    (logp2.sum() + ent2.sum()).backward()
    torch.testing.assert_close(hidden.grad, h32.grad.bfloat16())
    torch.testing.assert_close(weight.grad, w32.grad.bfloat16())


def test_frozen_weight_and_no_grad() -> None:
    hidden = torch.randn(10, 4, requires_grad=True)
    weight = torch.randn(9, 4)  # e.g. a frozen reference head
    targets = torch.randint(0, 9, (10,))
    logp, _ = token_logprobs(hidden, weight, targets, chunk_size=3)
    logp.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        logp2, _ = token_logprobs(hidden, weight, targets)
    torch.testing.assert_close(logp2, logp.detach())
    with pytest.raises(ValueError):
        token_logprobs(hidden, weight, targets[:5])


def _tiny_qwen2(tie: bool):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, attn_implementation="eager",
    )
    return Qwen2ForCausalLM(cfg).float()


@pytest.mark.parametrize("tie", [True, False])
def test_sequence_token_logprobs_matches_hf_naive(tie: bool) -> None:
    model = _tiny_qwen2(tie)
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([12, 7, 9])
    prompt_lengths = torch.tensor([5, 3, 6])
    b, t = 3, 12
    ids = torch.randint(0, 101, (b, t), generator=g)
    attn = (torch.arange(t)[None] < lengths[:, None]).long()
    ids = ids * attn  # pad id 0 on the right
    # Target t + 1 is a completion token: prompt_len <= t + 1 < length.
    pos = torch.arange(t - 1)[None] + 1
    loss_positions = (pos >= prompt_lengths[:, None]) & (pos < lengths[:, None])

    results = []
    for naive in (False, True):
        model.zero_grad()
        logp, ent = sequence_token_logprobs(
            model, ids, attn, temperature=0.8, chunk_size=4, with_entropy=True,
            loss_positions=loss_positions, naive=naive,
        )
        assert ent is not None and logp.shape == (b, t - 1)
        (logp.sum() * 0.7 + ent.sum() * 0.3).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), ent.detach(), grads))
    (lp, en, gr), (lp2, en2, gr2) = results
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(en, en2, rtol=1e-5, atol=1e-5)
    assert torch.all(lp[~loss_positions] == 0) and torch.all(lp[loss_positions] < 0)
    assert gr.keys() == gr2.keys() and len(gr) > 0
    for name in gr:
        torch.testing.assert_close(gr[name], gr2[name], rtol=1e-5, atol=1e-5, msg=name)

    # Default positions: every real next token, no entropy.
    lp_all, none = sequence_token_logprobs(model, ids, attn)
    lp_all2, _ = sequence_token_logprobs(model, ids, attn, naive=True)
    assert none is None
    torch.testing.assert_close(lp_all, lp_all2, rtol=1e-5, atol=1e-5)
    assert torch.all(lp_all[attn[:, 1:] == 0] == 0)


def _shared_batch():
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    comps = [(0, [20, 21, 22]), (0, [23]), (1, [30, 31, 32, 33]), (1, [34, 35])]
    u, lp = len(prompts), max(map(len, prompts))
    b, lc = len(comps), max(len(c) for _, c in comps)
    pid = torch.zeros(u, lp, dtype=torch.long)
    pm = torch.zeros(u, lp, dtype=torch.long)
    for i, p in enumerate(prompts):
        pid[i, : len(p)] = torch.tensor(p)
        pm[i, : len(p)] = 1
    cid = torch.zeros(b, lc, dtype=torch.long)
    cm = torch.zeros(b, lc, dtype=torch.long)
    for i, (_, c) in enumerate(comps):
        cid[i, : len(c)] = torch.tensor(c)
        cm[i, : len(c)] = 1
    gi = torch.tensor([g for g, _ in comps])
    # The same rollouts as full right-padded sequences.
    seqs = [prompts[g] + c for g, c in comps]
    w = max(map(len, seqs))
    ids = torch.zeros(b, w, dtype=torch.long)
    am = torch.zeros(b, w, dtype=torch.long)
    pos = torch.zeros(b, w - 1, dtype=torch.bool)
    for i, ((g, _c), s) in enumerate(zip(comps, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        am[i, : len(s)] = 1
        pos[i, len(prompts[g]) - 1 : len(s) - 1] = True
    return (pid, pm, cid, cm, gi), (ids, am, pos)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_prompt_path_equals_full_sequences(dtype: torch.dtype) -> None:
    """Running each prompt once and its completions on a repeated cache gives the same
    log-probabilities, entropies and gradients as the full sequences."""
    model = _tiny_qwen2(True).to(dtype)
    shared, full = _shared_batch()
    logp, ent = shared_prompt_token_logprobs(model, *shared, temperature=0.7, with_entropy=True)
    (logp.sum() + 0.5 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ids, am, pos = full
    ref_lp, ref_ent = sequence_token_logprobs(model, ids, am, temperature=0.7, with_entropy=True, loss_positions=pos)
    (ref_lp.sum() + 0.5 * ref_ent.sum()).backward()
    cm = shared[3].bool()
    tol = 1e-5
    assert torch.allclose(logp[cm], ref_lp[pos], atol=tol)
    assert torch.allclose(ent[cm], ref_ent[pos], atol=tol)
    assert (logp[~cm] == 0).all()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=tol), n
