"""One decoding step's sampling distribution and a seeded draw per row.

The logprobs a server reports must be those of the distribution the token was actually drawn
from (after temperature, top-k and top-p), since the trainer's importance ratios divide by
them. Greedy rows (temperature 0) report the untempered, unfiltered distribution, like vLLM
and SGLang do, so that a greedy probe can still be compared with a local forward pass.

Each row draws from its own ``torch.Generator`` with one uniform number per step (inverse
CDF), so a sequence's tokens depend only on its own seed and probabilities, never on which
other sequences share the batch.
"""

from __future__ import annotations

import torch


def processed_logprobs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probabilities of the sampling distribution, one row per sequence.

    Args:
        logits: ``[B, V]`` raw next-token logits.
        temperature: ``[B]``; 0 marks a greedy row.
        top_k: ``[B]`` integers; 0 (or >= V) keeps every token.
        top_p: ``[B]`` in (0, 1]; 1 keeps every token.
        banned: optional ``[B, V]`` mask of tokens that may not be chosen (e.g. EOS before
            ``min_tokens``); they get probability 0 in the reported distribution too.
    """
    logits = logits.float()
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    vocab = logits.shape[-1]
    filtered = ~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1))
    if bool(filtered.any()):
        values, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(-1)
        drop = ranks >= k
        # vLLM's order: top-k first, then top-p over what top-k kept.
        probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs
        # Keep a token while the mass before it is still short of top_p; the first always stays.
        drop |= before >= top_p.unsqueeze(-1)
        drop &= filtered.unsqueeze(-1)
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def draw(
    logprobs: torch.Tensor, greedy: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row: argmax for greedy rows, else inverse-CDF with the row's generator."""
    uniforms = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators])
    # float64 cumulative sums: a 150k-token vocabulary in float32 drifts by ~1e-4.
    cdf = logprobs.double().exp().cumsum(dim=-1)
    target = uniforms.to(cdf.device, torch.float64) * cdf[:, -1]
    sampled = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    sampled = sampled.clamp(max=logprobs.shape[-1] - 1)
    return torch.where(greedy.to(sampled.device), logprobs.argmax(dim=-1), sampled)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator for one sequence; ``None`` means a fresh random seed."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        # manual_seed takes [-2**63, 2**64); wrap so that seed + choice index never overflows.
        gen.manual_seed(seed % (1 << 64))
    return gen
