"""Per-token log-probabilities (and entropies) of a causal LM, in fp32, without ``[N x V]`` tensors.

A policy-gradient step needs ``log pi(y_t | y_<t)`` for the sampled tokens only, but the usual
path (``model(...).logits`` then ``log_softmax``) materialises the logits and the log-softmax
for every position and every vocabulary entry, and autograd keeps them for backward. At the
Qwen2.5 vocabulary (151,936) that is 0.6 MB per token per fp32 copy: 4,096 tokens cost several
GB. TRL's ``selective_log_softmax`` avoids the second copy; here nothing of size
``tokens x vocab`` is kept at all:

* :func:`token_logprobs` is a custom autograd function over chunks of tokens. Forward computes
  each chunk's logits from the final hidden states and the output embedding, reduces them to
  ``logsumexp``, the target logit and optionally the entropy, and drops them. Only the inputs
  and one float per token are saved; backward recomputes each chunk's logits (one extra
  matmul, the classic compute-for-memory trade) and accumulates the gradients wrt the hidden
  states and the weight.
* :func:`sequence_token_logprobs` runs an HF causal LM's decoder body and feeds only the
  positions that are trained on (completion tokens) to :func:`token_logprobs`.

All softmax arithmetic is fp32 even for bf16 models: logits must be fp32 before the
log-softmax, since bf16 logits are off by ~0.1 nats at |z| ~ 20, which would show up as a fake
trainer/server mismatch in the importance ratios. The head's products follow torch's fp32
matmul setting: on CUDA the trainer lets them use TF32 (``trainer.tf32``), which keeps the
logits fp32 and ~0.01 nats from true fp32 at a fraction of the time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .models import cache_kwarg

__all__ = [
    "entropy_from_logits",
    "selective_log_softmax",
    "shared_prompt_token_logprobs",
    "sequence_token_logprobs",
    "token_logprobs",
]


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """Naive reference: ``log_softmax(logits.float())`` gathered at ``index``.

    Args:
        logits: ``[..., V]`` logits of any float dtype (upcast to fp32 first).
        index: ``[...]`` token ids.

    Returns:
        ``[...]`` fp32 log-probabilities. Materialises the full fp32 log-softmax: use it for
        tests and benchmarks, :func:`token_logprobs` for training.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Naive reference: entropy ``-sum_v p_v log p_v`` of ``softmax(logits.float())``, ``[...]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64 (so ``gradcheck`` can verify the math exactly)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _chunk_logits(h: Tensor, w32: Tensor, temperature: float) -> Tensor:
    """Logits ``h @ w.T / temperature`` of one chunk in ``w32``'s dtype (a fresh ``[c, V]`` buffer)."""
    z = h.to(w32.dtype) @ w32.t()
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """``logp[n] = log_softmax(hidden[n] @ weight.T / T)[targets[n]]`` (+ entropy), chunked.

    Peak extra memory is two ``[chunk, V]`` fp32 buffers (one without entropy) plus, in
    backward, an fp32 ``[V, H]`` gradient accumulator (and an fp32 copy of a low-precision
    weight), instead of several ``[N, V]`` tensors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        dtype = _compute_dtype(hidden, weight)
        logp = hidden.new_empty(n, dtype=dtype)
        lse = hidden.new_empty(n, dtype=dtype)
        ent = hidden.new_empty(n if with_entropy else 0, dtype=dtype)
        # Autocast would turn the matmul back into bf16; the whole point is fp32 logits.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w32 = weight.to(dtype)
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                z = _chunk_logits(hidden[s:e], w32, temperature)
                tgt = z.gather(1, targets[s:e, None]).squeeze(1)
                # Stable logsumexp done by hand, in place, so at most two [c, V] buffers live.
                m = z.amax(dim=1, keepdim=True)
                z.sub_(m)
                if with_entropy:
                    ez = torch.exp(z)
                    sumexp = ez.sum(1)
                    # H = lse - E_p[z] = log(sumexp) - sum(e^z' z') / sumexp with z' = z - max.
                    ent[s:e] = sumexp.log() - ez.mul_(z).sum(1) / sumexp
                    del ez
                else:
                    sumexp = z.exp_().sum(1)
                lse[s:e] = m.squeeze(1) + sumexp.log()
                logp[s:e] = tgt - lse[s:e]
                del z
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor | None, grad_ent: Tensor | None):  # type: ignore[override]
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.with_entropy:
            grad_ent = None
        if (grad_logp is None and grad_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        t, c, n = ctx.temperature, ctx.chunk_size, hidden.shape[0]
        dtype = lse.dtype
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w32 = weight.to(dtype)
            gh = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
            gw = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
            for s in range(0, n, c):
                e = min(s + c, n)
                h = hidden[s:e].to(dtype)
                # log p = z - lse, recomputed rather than saved (the memory we are saving).
                logq = _chunk_logits(h, w32, t).sub_(lse[s:e, None])
                if grad_ent is not None:
                    # dH/dz = -p (log p + H); dlogp_y/dz = onehot(y) - p. Combined:
                    # dz = p * (-g_logp - g_H (log p + H)) + g_logp * onehot(y).
                    p = torch.exp(logq)
                    dz = logq.add_(ent[s:e, None]).mul_(-grad_ent[s:e, None])
                    if grad_logp is not None:
                        dz.sub_(grad_logp[s:e, None])
                    dz.mul_(p)
                    del p
                else:
                    dz = logq.exp_().mul_(-grad_logp[s:e, None])  # type: ignore[index]
                if grad_logp is not None:
                    dz.scatter_add_(1, targets[s:e, None], grad_logp[s:e, None].to(dtype))
                if t != 1.0:
                    dz.div_(t)  # z = h W^T / T
                if gh is not None:
                    torch.mm(dz, w32, out=gh[s:e])
                if gw is not None:
                    gw.addmm_(dz.t(), h)
                del dz, logq
        grad_h = gh.to(hidden.dtype) if gh is not None else None
        grad_w = gw.to(weight.dtype) if gw is not None else None
        return grad_h, grad_w, None, None, None, None


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of ``targets`` under ``softmax(hidden @ weight.T / temperature)``.

    Memory-lean replacement for ``selective_log_softmax(hidden @ weight.T / T, targets)``:
    values and gradients are the same (to fp32 rounding), but no ``[N, V]`` tensor is kept
    for backward and at most two ``[chunk_size, V]`` fp32 buffers exist at any time.

    Args:
        hidden: ``[N, H]`` final hidden states (after the model's last norm), any float dtype;
            its gradient comes back in its own dtype.
        weight: ``[V, H]`` output embedding (``lm_head.weight``); same dtype rules.
        targets: ``[N]`` token ids whose log-probabilities are wanted.
        temperature: logits are divided by it before the softmax. Use the sampling
            temperature so that the ratios compare the same distribution the server sampled
            from (TRL does the same).
        chunk_size: tokens per chunk; trades peak memory (``2 * chunk_size * V * 4`` bytes)
            against matmul efficiency.
        with_entropy: also return the entropy of each position's distribution (for the
            entropy bonus and the entropy metric), differentiable as well.

    Returns:
        ``(logp[N], entropy[N] or None)``, both fp32 (fp64 if an input is fp64).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            "token_logprobs expects hidden [N, H], weight [V, H], targets [N]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logp, ent = _ChunkedTokenLogprobs.apply(
        hidden, weight, targets.long(), float(temperature), int(chunk_size), bool(with_entropy)
    )
    return logp, (ent if with_entropy else None)


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, Tensor]:
    """The decoder body and the output-embedding weight of an HF causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} exposes neither get_decoder() nor .model")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding weight")
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError(
            "output layers with a bias are not supported by the chunked log-probabilities the trainer "
            "uses (only sequence_token_logprobs(naive=True) handles them)"
        )
    config = getattr(model, "config", None)
    # Models whose logits are not plain ``hidden @ W.T`` would silently get wrong values.
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"config.{attr} is set: the trainer's chunked log-probabilities assume logits = hidden @ W.T "
                "(only sequence_token_logprobs(naive=True) handles this model)"
            )
    return decoder, head.weight


def sequence_token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    loss_positions: Tensor | None = None,
    naive: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Next-token log-probabilities of right-padded sequences under an HF causal LM.

    Position ``t`` of the result is ``log p(input_ids[:, t + 1] | input_ids[:, :t + 1])``.

    Args:
        model: a causal LM whose logits are ``decoder(x) @ get_output_embeddings().weight.T``
            (Qwen2, Llama, Mistral, ...).
        input_ids: ``[B, T]`` prompt + completion ids, right-padded.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        temperature: divides the logits (see :func:`token_logprobs`).
        chunk_size: tokens per chunk in :func:`token_logprobs`.
        with_entropy: also return per-position entropies.
        loss_positions: ``[B, T - 1]`` bool; only these positions are computed (typically the
            completion tokens, so the prompt's hundreds of positions cost no vocabulary
            matmul). Default: every position whose target is a real token
            (``attention_mask[:, 1:]``).
        naive: compute ``model(...).logits`` and a full fp32 log-softmax instead (the
            reference path for tests, and a fallback for models with unusual heads).

    Returns:
        ``(logp[B, T - 1], entropy[B, T - 1] or None)`` in fp32; positions outside
        ``loss_positions`` are 0.0.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, T]; got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    b, t = input_ids.shape
    targets = input_ids[:, 1:]
    if loss_positions is None:
        loss_positions = attention_mask[:, 1:].bool()
    elif loss_positions.shape != (b, t - 1):
        raise ValueError(f"loss_positions must be [B, T - 1] = {(b, t - 1)}, got {tuple(loss_positions.shape)}")
    loss_positions = loss_positions.bool()

    if naive:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, :-1].float() / temperature
        logp = selective_log_softmax(logits, targets)
        ent = entropy_from_logits(logits) if with_entropy else None
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp = torch.where(loss_positions, logp, zero)
        ent = torch.where(loss_positions, ent, zero) if ent is not None else None
        return logp, ent

    decoder, weight = _decoder_and_head(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return _at_positions(hidden[:, :-1], weight, targets, loss_positions, temperature, chunk_size, with_entropy)


def _at_positions(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    positions: Tensor,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """:func:`token_logprobs` of the ``[B, L]`` bool ``positions`` only (only they pay for the
    ``[*, V]`` matmuls), scattered back to ``[B, L]`` with 0.0 elsewhere."""
    sel_logp, sel_ent = token_logprobs(
        hidden[positions], weight, targets[positions], temperature, chunk_size, with_entropy
    )
    logp = sel_logp.new_zeros(positions.shape).masked_scatter(positions, sel_logp)
    ent = sel_ent.new_zeros(positions.shape).masked_scatter(positions, sel_ent) if sel_ent is not None else None
    return logp, ent


def shared_prompt_token_logprobs(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_index: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    loss_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of completions that share prompts, running each prompt once.

    A GRPO group is G completions of one prompt, and prompts are often far longer than the
    answers: instead of G forward/backward passes over the same prompt, the prompt runs once,
    its key/value cache is repeated for its completions, and the completions run on top of it.
    Gradients flow back through the shared cache, so values and gradients equal those of
    :func:`sequence_token_logprobs` on the concatenated sequences (to float rounding).

    Args:
        prompt_ids: ``[U, Lp]`` the distinct prompts, right-padded.
        prompt_mask: ``[U, Lp]`` 1 for prompt tokens, 0 for padding.
        completion_ids: ``[B, Lc]`` completions, right-padded.
        completion_mask: ``[B, Lc]`` 1 for completion tokens.
        group_index: ``[B]`` the prompt (row of ``prompt_ids``) of each completion.
        loss_positions: ``[B, Lc]`` bool, the completion tokens whose log-probability is
            wanted (default: ``completion_mask``).
        temperature, chunk_size, with_entropy: as in :func:`token_logprobs`.

    Returns:
        ``(logp[B, Lc], entropy[B, Lc] or None)``: position ``j`` is
        ``log p(completion[j] | prompt, completion[:j])``; 0.0 outside ``loss_positions``.
    """
    from transformers import DynamicCache

    lc = completion_ids.shape[1]
    if loss_positions is None:
        loss_positions = completion_mask.bool()
    loss_positions = loss_positions.bool()
    decoder, weight = _decoder_and_head(model)
    cache_kw = cache_kwarg(decoder)
    out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    prompt_hidden = out.last_hidden_state
    cache = DynamicCache()
    for layer, (keys, values) in enumerate((layer.keys, layer.values) for layer in out[cache_kw].layers):
        cache.update(keys.index_select(0, group_index), values.index_select(0, group_index), layer)
    prompt_lens = prompt_mask.sum(1)[group_index]
    # Positions continue each prompt's real length; the prompt's padding columns are masked.
    positions = prompt_lens[:, None] + torch.arange(lc, device=completion_ids.device)[None]
    mask = torch.cat([prompt_mask.index_select(0, group_index), completion_mask], dim=1)
    c_out = decoder(
        input_ids=completion_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache}
    )
    # Token j is predicted from the state before it: the prompt's last state for j = 0.
    last_prompt = prompt_hidden[group_index, prompt_lens - 1]
    hidden = torch.cat([last_prompt[:, None], c_out.last_hidden_state[:, :-1]], dim=1)
    return _at_positions(hidden, weight, completion_ids, loss_positions, temperature, chunk_size, with_entropy)
