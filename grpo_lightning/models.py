"""Loading policies and tokenizers; resolving the ``tiny-sat`` preset to a local folder.

    python -m grpo_lightning.models tiny-sat     # build the preset (once) and print its path

Any place that takes a model accepts a local Hugging Face folder, a hub id already in the
local cache, or ``tiny-sat``. Nothing here downloads: hub ids load only from the local cache.
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

TINY_SAT = "tiny-sat"


def cache_dir() -> Path:
    """Where built presets live: ``$GRPO_LIGHTNING_CACHE`` or ``~/.cache/grpo_lightning``."""
    root = os.environ.get("GRPO_LIGHTNING_CACHE") or Path.home() / ".cache" / "grpo_lightning"
    return Path(root)


def resolve_model_path(name_or_path: str) -> str:
    """Map ``tiny-sat`` to its built folder (building it on first use); pass others through."""
    if name_or_path != TINY_SAT:
        return name_or_path
    from .tiny_sat import TinySatRecipe, build_tiny_sat

    recipe = TinySatRecipe()
    target = cache_dir() / f"tiny-sat-{recipe.digest()}"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (trainer, server, test workers) may ask at once: one builds,
    # into a temporary folder renamed at the end, so nobody sees a half-written preset.
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            print(f"building the tiny-sat preset in {target} (once, about a minute)", file=sys.stderr)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-sat-"))
            build_tiny_sat(tmp, recipe)
            tmp.rename(target)
    return str(target)


def cache_kwarg(module: torch.nn.Module) -> str:
    """The name of ``module.forward``'s key/value-cache argument (and output field):
    transformers 5 renamed ``past_key_values`` to ``cache``; both are accepted."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _offline_kwargs(name_or_path: str) -> dict[str, Any]:
    # A hub id must come from the local cache: nothing is downloaded at run time.
    return {} if Path(name_or_path).exists() else {"local_files_only": True}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, chat: bool = True):
    """A tokenizer with a pad token and a known EOS, and with ``chat`` a chat template (the
    trainer renders prompts with it; a server only decodes, so base models serve too)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **_offline_kwargs(path))
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path} has no EOS token; set one in its tokenizer_config.json")
    if tok.pad_token_id is None:
        # Padding is always masked out, so EOS is a safe stand-in.
        tok.pad_token = tok.eos_token
    if chat and not getattr(tok, "chat_template", None):
        raise ValueError(
            f"tokenizer of {name_or_path} has no chat template; use an instruct/chat checkpoint "
            "or add a chat_template to its tokenizer_config.json"
        )
    tok.padding_side = "right"
    return tok


def stop_token_ids(tokenizer, model_path: str | None = None) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS plus the generation config's."""
    ids = {int(tokenizer.eos_token_id)}
    if model_path is not None:
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(resolve_model_path(model_path), **_offline_kwargs(model_path))
        except OSError:
            gen = None
        eos = getattr(gen, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)


def load_policy(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
):
    """A causal LM loaded from safetensors (``use_safetensors`` is not relaxed)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        **_offline_kwargs(path),
    )
    return model.to(device)


if __name__ == "__main__":
    print(resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else TINY_SAT))
