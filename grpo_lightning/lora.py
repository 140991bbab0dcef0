"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for the policy.

With ``model.lora.enabled`` the policy's base weights are frozen and PEFT injects trainable
low-rank adapters ``W + (alpha / r) * B @ A`` into the chosen linear layers; only the adapters
train (fp32), and the reference model of the KL term is the same model with its adapters
switched off, so no second copy of the model is held.

After each iteration only the adapter is written (a standard PEFT folder: ``adapter_config.json``
+ ``adapter_model.safetensors``, ``is_adapter_folder``) and sent to the server as an adapter
(``weight_sync.sync_adapter``). The built-in server merges it into its weights from the base
weights it keeps in memory (``merge_into``, the arithmetic of PEFT's ``merge_and_unload``) and reports a
checksum of the adapter it applied on top of its base's (``with_adapter_checksum``), which the
trainer recomputes from the adapter it saved.

    python -m grpo_lightning export --adapter RUN/checkpoints/iter_119 --out merged/

merges a checkpoint's adapter into its base model as an ordinary Hugging Face folder.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
QWEN2_LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraArgs:
    """Low-rank adapters instead of a full fine-tune (LoRA, Hu et al. 2021), through PEFT."""

    enabled: bool = False
    """Train LoRA adapters on the frozen policy instead of every weight. The reference model of
    the KL term is then the base model (adapters off): no copy of the model is held, and only
    the adapter (megabytes) is sent to the inference server after each iteration."""
    rank: int = 16
    """r, the rank of each adapter ``B @ A`` (at least 1). Servers cap it: vLLM and SGLang are
    launched with ``--max-lora-rank`` set to it."""
    alpha: float = 32.0
    """lora_alpha: the adapter's update is scaled by ``alpha / rank`` (> 0)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (in [0, 1)); 0 keeps the trainer's
    log-probabilities those of the served model."""
    target_modules: list[str] = field(default_factory=lambda: list(QWEN2_LLAMA_PROJECTIONS))
    """Names (or name suffixes) of the linear layers that get adapters; the default is every
    attention and MLP projection of Qwen2 / Llama models. Each must match a layer of the model;
    the output layer (``lm_head``) cannot be adapted."""


def check_args(lora: LoraArgs) -> None:
    """The one-line error naming the key, for values no model could train with."""
    bad = {
        "rank": lora.rank >= 1,
        "alpha": lora.alpha > 0,
        "dropout": 0 <= lora.dropout < 1,
        "target_modules": bool(lora.target_modules),
    }
    wrong = [k for k, ok in bad.items() if not ok]
    if wrong:
        values = ", ".join(f"model.lora.{k}={getattr(lora, k)!r}" for k in wrong)
        raise ValueError(f"invalid LoRA config: {values} (rank >= 1, alpha > 0, 0 <= dropout < 1, target_modules not empty)")


def check_strategy(enabled: bool, strategy: object) -> None:
    """LoRA trains in one process or under DDP (every rank holds the frozen base and the
    adapters, whose gradients DDP averages); a sharding strategy is refused, naming the keys,
    before any model or server starts: sharding the adapted model, its adapter-only checkpoint
    and the reference under ``disable_adapter`` are not built."""
    if not enabled or strategy is None:
        return
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", None) or type(strategy).__name__
    if any(s in str(name).lower() for s in ("fsdp", "modelparallel", "deepspeed")):
        raise ValueError(
            f"model.lora.enabled=true cannot run with trainer.strategy={name}: LoRA is not sharded; use "
            "trainer.strategy ddp (only the small adapters are trained and averaged) or model.lora.enabled false"
        )


def check_targets(model: torch.nn.Module, lora: LoraArgs) -> None:
    """Every target module names a linear layer of ``model``, and none is its output layer."""
    names = [n for n, _ in model.named_modules()]
    head = model.get_output_embeddings()
    head_names = {n for n, m in model.named_modules() if m is head}
    for target in lora.target_modules:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(
                f"model.lora.target_modules: {target!r} matches no layer of {type(model).__name__} "
                f"(its layers end in e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in names if n})[:12])})"
            )
        if head_names & set(hits):
            # The trainer's chunked log-probabilities read the output layer's weight directly:
            # an adapter there would be silently left out of every log-probability.
            raise ValueError(f"model.lora.target_modules: {target!r} is the output layer, which cannot be adapted")


def apply_lora(model: torch.nn.Module, lora: LoraArgs) -> torch.nn.Module:
    """The policy wrapped by PEFT: base weights frozen, fp32 adapters on ``lora.target_modules``."""
    from peft import LoraConfig, get_peft_model

    check_args(lora)
    check_targets(model, lora)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target that is a norm or another unsupported layer
        raise ValueError(f"model.lora.target_modules: {' '.join(str(exc).split())}") from None
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters even on a bf16 base (AdamW state follows)
    return peft_model


def frozen_keys(module: torch.nn.Module) -> list[str]:
    """State-dict keys of everything but ``module``'s trainable parameters: the base weights a LoRA checkpoint
    leaves out (they are the base model's, re-read from it on resume)."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    # From the state dict, not named_parameters(): that lists a tied weight (lm_head) only once.
    return [k for k in module.state_dict() if k not in trainable]


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model (the reference policy): ``model`` with its adapters disabled."""
    with model.disable_adapter():
        yield model


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter folder was trained on (``base_model_name_or_path``)."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}/{ADAPTER_CONFIG} names no base_model_name_or_path; pass --base")
    return str(base)


def adapter_name(folder: str | Path, prefix: str = "lora") -> str:
    """A name for the adapter in ``folder`` that changes with its weights: servers refuse to
    load a second adapter under a loaded name, and equal names then mean equal weights."""
    digest = hashlib.sha256((Path(folder) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:12]
    return f"{prefix}-{digest}"


def adapter_rank(folder: str | Path) -> int:
    return int(json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["r"])


# ---------------------------------------------------------------------- merging (server side)


def read_adapter(adapter_dir: str | Path) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``alpha / r`` and, per base weight name, the adapter's ``(A, B)``: what a server applies."""
    from safetensors.torch import load_file

    # adapter_config.json read directly: importing PEFT would cost the server seconds at its first adapter.
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    unsupported = {
        "use_dora": config.get("use_dora", False),
        "use_rslora": config.get("use_rslora", False),
        "fan_in_fan_out": config.get("fan_in_fan_out", False),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "bias": config.get("bias", "none") != "none",
    }
    if config.get("peft_type", "LORA") != "LORA" or any(unsupported.values()):
        raise ValueError(f"adapter options not supported here: {[k for k, v in unsupported.items() if v] or config.get('peft_type')}")
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS), device="cpu")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, part = key.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"unsupported adapter tensor {key} (only LoRA on linear layers)")
        base = module.removeprefix("base_model.model.") + ".weight"
        pairs.setdefault(base, {})[part[0]] = t
    if any(len(p) != 2 for p in pairs.values()):
        raise ValueError(f"adapter {adapter_dir} has an A without a B (or the reverse)")
    return config["lora_alpha"] / config["r"], {k: (p["A"], p["B"]) for k, p in pairs.items()}


def check_fits(shapes: Mapping[str, torch.Size], pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raise ValueError unless every ``(A, B)`` changes a weight of ``shapes`` (name to shape) and fits it."""
    for key, (a, b) in pairs.items():
        if key not in shapes:
            raise ValueError(f"the adapter changes a weight the base model does not have: {key}")
        if (b.shape[0], a.shape[1]) != tuple(shapes[key]) or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter shape {(b.shape[0], a.shape[1])} does not fit {key} {tuple(shapes[key])}")


def merge_into(out: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """``out = base + (B @ A) * scaling``, in fp32 (PEFT's merge arithmetic), then cast to
    ``out``'s dtype. An fp32 CPU ``out`` (the CPU server's weights) is computed in place: no
    temporary the size of the weight."""
    if out.dtype == torch.float32 and out.device.type == "cpu":
        torch.matmul(b.float(), a.float(), out=out)
        out.mul_(scaling).add_(base.float())
    else:
        dev = out.device
        out.copy_((b.to(dev, torch.float32) @ a.to(dev, torch.float32)).mul_(scaling).add_(base.to(dev, torch.float32)))


def merge_adapter(
    base: Mapping[str, torch.Tensor], scaling: float, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The adapted weights ``W + (B @ A) * alpha / r`` of the weights the adapter changes, from
    ``base`` (those weights before any adapter), as ``merge_into`` computes them, in ``dtype``."""
    check_fits({k: t.shape for k, t in base.items()}, pairs)
    out = {key: torch.empty(base[key].shape, dtype=dtype) for key in pairs}
    for key, (a, b) in pairs.items():
        merge_into(out[key], base[key], a, b, scaling)
    return out


def adapter_checksum(scaling: float, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """The checksum of an adapter as applied: its scale and every ``(A, B)`` by the weight it changes."""
    from .inference.weights import state_dict_checksum

    tensors = {f"{key}|{part}": t for key, pair in pairs.items() for part, t in zip("AB", pair, strict=True)}
    return hashlib.sha256(f"{scaling!r}|{state_dict_checksum(tensors)}".encode()).hexdigest()[:16]


def with_adapter_checksum(base_checksum: str, adapter: str) -> str:
    """The weights checksum of a built-in server serving the base weights of checksum
    ``base_checksum`` with the adapter of checksum ``adapter`` merged. Both sides compute it from
    the adapter alone (the base's checksum is known once per run): verifying a sync costs the
    adapter's size, not the model's."""
    return hashlib.sha256(f"{base_checksum}+{adapter}".encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _base_checksum(folder: str, dtype: str, stamp: tuple) -> str:
    from .inference.weights import folder_checksum

    return folder_checksum(folder, dtype)


def base_checksum(folder: str | Path, dtype: str) -> str:
    """``weights.folder_checksum`` of a base model, computed once per process (and again if its
    files change): every adapter sync of a run checks against the same base."""
    from .inference.weights import safetensors_files

    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in safetensors_files(folder))
    return _base_checksum(str(folder), dtype, stamp)


def served_checksum(base_dir: str | Path, adapter_dir: str | Path, dtype: str) -> str:
    """The checksum a built-in server serving ``base_dir`` in ``dtype`` reports with the adapter
    in ``adapter_dir`` loaded."""
    return with_adapter_checksum(base_checksum(base_dir, dtype), adapter_checksum(*read_adapter(adapter_dir)))


# ---------------------------------------------------------------------- export command


def export_merged(adapter_dir: str | Path, out: str | Path, base: str | None = None, trust_remote_code: bool = False) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base model (PEFT's ``merge_and_unload``)
    and write an ordinary Hugging Face folder (weights in the base's dtype, and the tokenizer)."""
    from peft import PeftModel

    from .models import load_policy, load_tokenizer

    base = base or adapter_base(adapter_dir)
    model = load_policy(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    dtype = model.config.dtype if isinstance(getattr(model.config, "dtype", None), torch.dtype) else torch.float32
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base
    load_tokenizer(str(tokenizer_source), trust_remote_code=trust_remote_code, chat=False).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m grpo_lightning export --adapter DIR --out DIR [--base MODEL]``."""
    p = argparse.ArgumentParser(
        prog="grpo-lightning export",
        description="Merge a LoRA checkpoint (a PEFT adapter folder, e.g. checkpoints/iter_119) into "
        "its base model and write an ordinary Hugging Face folder, servable anywhere.",
    )
    p.add_argument("--adapter", required=True, help="the adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="where to write the merged model")
    p.add_argument("--base", default=None, help="the base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    if not is_adapter_folder(args.adapter):
        print(f"error: {args.adapter} is not a LoRA adapter folder (no {ADAPTER_CONFIG})", file=sys.stderr)
        return 2
    try:
        out = export_merged(args.adapter, args.out, base=args.base, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(out)
    return 0
