"""Reading a Hugging Face folder's weights and fingerprinting them.

The server and the trainer both need to name "these exact weights": the server reports the
checksum of what it serves, and weight sync recomputes it from the folder the trainer wrote,
so a sync that silently kept stale weights is caught. The checksum covers the tensors stored
in the folder's safetensors files (tied copies such as ``lm_head.weight`` are not stored, so
they are not hashed twice), each cast to the serving dtype, because that is what the server
holds in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def safetensors_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, shards in index order."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def checkpoint_keys(folder: str | Path) -> list[str]:
    """Names of the tensors stored in the folder (reads headers only)."""
    from safetensors import safe_open

    keys: list[str] = []
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            keys.extend(handle.keys())
    return sorted(keys)


def load_checkpoint(
    folder: str | Path, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All stored tensors of the folder on CPU, floating ones cast to ``dtype`` when given."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        tensors.update(load_file(str(f), device="cpu"))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


def state_dict_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short hex digest of names, dtypes, shapes and bytes, independent of dict order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Viewing as bytes works for every dtype (numpy has no bfloat16) and copies nothing.
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def folder_checksum(folder: str | Path, dtype: torch.dtype | str = torch.float32) -> str:
    """The checksum a server holding ``folder`` in ``dtype`` reports."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    return state_dict_checksum(load_checkpoint(folder, dtype))
