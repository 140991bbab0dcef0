"""Sharded training with PyTorch FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``.

Every rank holds a 1/N slice of each parameter, its gradient and its AdamW state; a decoder
layer's full weights exist only while that layer runs (all-gathered before its forward and
backward, resharded after). Gradients are reduce-scattered and *averaged* over the ranks after
every backward, as DDP all-reduces and averages them, so the loss normalisation written for DDP
(``loss.Normalizer``) holds unchanged.

Nothing here depends on what the policy is: the units are whatever the model declares as its
unsplittable blocks (Hugging Face's ``_no_split_modules``: the decoder layers), then the root,
so a policy wrapped by an adapter library shards the same way (frozen and trainable parameters
may share a unit under FSDP2).

Exporting a sharded policy to Hugging Face safetensors is a collective: every rank takes part
in gathering one tensor at a time (``DTensor.full_tensor``), and rank 0 alone keeps it on the
host and writes it; a shard file is written and freed once it reaches ``max_shard_bytes``, so
rank 0's peak host memory is one shard file, not one model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module | None) -> bool:
    """True when ``model``'s parameters are FSDP2 shards (DTensors)."""
    if model is None:
        return False
    dtensor = _dtensor_type()
    return any(isinstance(p, dtensor) for p in model.parameters())


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The blocks sharded one by one: every submodule whose class the model lists in
    ``_no_split_modules`` (the decoder layers of a Hugging Face model), outermost first."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not units:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules (its decoder layer class): "
            "it cannot be sharded per layer"
        )
    # A unit nested in another unit is already covered by it.
    inside = {id(sub) for u in units for sub in u.modules() if sub is not u}
    return [u for u in units if id(u) not in inside]


class ShardedRoot(nn.Module):
    """The FSDP2 root around a model: ``root(fn, *args)`` is ``fn(model, *args)`` with the
    model's non-layer parameters (embeddings, final norm, LM head) gathered for the call.

    The log-probabilities never run the model's own forward (they run its decoder body and
    apply the LM head's weight in chunks, ``logprobs.py``), so the root whose forward gathers
    those parameters must be a module around the whole computation, not the model itself.
    It stays outside the LightningModule's tree: parameter names, checkpoints and the
    optimizer see the model alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


def shard(model: nn.Module, mesh: Any, mixed_precision: bool) -> ShardedRoot:
    """``fully_shard`` each decoder layer of ``model``, then a :class:`ShardedRoot` around it
    (which takes the embeddings, the final norm and the LM head), over ``mesh``.

    ``mixed_precision``: compute in bf16 (parameters gathered as bf16) and reduce gradients in
    fp32, keeping the sharded fp32 parameters as master weights (CUDA)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    for unit in sharding_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    root = ShardedRoot(model)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return root


def call(root: ShardedRoot, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(model, *args)`` through the sharded root (collective: every rank calls it)."""
    out = root(fn, *args, **kwargs)
    if not torch.is_grad_enabled():
        # No backward will reshard what the root keeps gathered after its forward.
        root.reshard()
    return out


def initialise_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer the state its first step would create, with step counts at 0.

    Distributed checkpointing initialises an empty optimizer's state by stepping it once with
    zero gradients (lr 0) when the first checkpoint is saved, which leaves Adam's step count at
    1 and so changes the bias correction of the first real step. Doing the same here, then
    resetting the counts, makes the state exactly that of a fresh optimizer."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if optimizer.state or not params:
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor: ``clip_grad_norm_`` over DTensor gradients returns a
    DTensor whose value is only complete after a collective."""
    return norm.full_tensor() if isinstance(norm, _dtensor_type()) else norm


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, _dtensor_type()) else tensor


def _unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # Tied weights (lm_head = embed_tokens) are one parameter under two names: store it once,
    # under its first name, as ``save_pretrained`` does.
    seen: set[int] = set()
    out = []
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            out.append((name, value))
    return out


def _plan_shards(state: list[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, t) in enumerate(state):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def gathered_tensors(
    model: nn.Module, write: bool, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Each stored tensor of ``model`` in full, one at a time (a collective per sharded tensor:
    every rank must iterate to the end); on the CPU where ``write``, None elsewhere.

    ``keep``: only the tensors whose state-dict name it accepts (e.g. an adapter's)."""
    dtensor = _dtensor_type()
    for name, value in _unique_state(model):
        if keep is not None and not keep(name):
            continue
        full = value.detach()
        if isinstance(full, dtensor):
            full = full.full_tensor()
        yield name, (full.cpu().contiguous() if write else None)


def write_hf_weights(model: nn.Module, out: Path, write: bool, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Stream ``model``'s full weights into ``out`` as Hugging Face safetensors (collective).

    One file ``model.safetensors`` when the model fits ``max_shard_bytes``, else numbered shards
    plus ``model.safetensors.index.json`` (the layout ``from_pretrained``, vLLM and SGLang read).
    Only the rank with ``write`` touches the disk."""
    from safetensors.torch import save_file

    state = _unique_state(model)
    shards = _plan_shards(state, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    stream = gathered_tensors(model, write)
    weight_map: dict[str, str] = {}
    total = 0
    for file, members in zip(names, shards, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for _ in members:
            name, tensor = next(stream)
            if tensor is not None:
                tensors[name] = tensor
                weight_map[name] = file
                total += tensor.numel() * tensor.element_size()
        if write:
            save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors  # freed before the next shard is gathered
    if write and len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_pretrained_sharded(model: nn.Module, out: Path, write: bool, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """A sharded Hugging Face model's folder: its config (and generation config) and its full
    weights, written by the rank with ``write`` (collective: call it on every rank)."""
    if write:
        out.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(out)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(out)
    write_hf_weights(model, out, write, max_shard_bytes)


class RankZeroCalls:
    """Lets rank 0 run a collective function (a forward pass of the sharded policy) at moments
    only it knows of, such as the log-probability probe inside a weight sync: the other ranks
    wait in :meth:`serve` and join every call rank 0 makes until it calls :meth:`close`.

    ``broadcast`` is the strategy's object broadcast from rank 0."""

    def __init__(self, fn: Callable[..., Any], broadcast: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.broadcast = broadcast

    def __call__(self, *args: Any) -> Any:
        """On rank 0: announce the call to the other ranks, then make it with them."""
        self.broadcast(args)
        return self.fn(*args)

    def serve(self) -> None:
        """On the other ranks: join rank 0's calls until it closes."""
        while (args := self.broadcast(None)) is not None:
            self.fn(*args)

    def close(self) -> None:
        """On rank 0: release the serving ranks (always, even when the sync failed)."""
        self.broadcast(None)
