"""The subcommands that are not LightningCLI's, dispatched before the training stack loads.

``serve``, ``sweep`` and ``plot`` need neither Lightning nor the trainer (``plot`` not even
torch), so ``python -m grpo_lightning plot ...`` must not pay for importing them.
"""

from __future__ import annotations

import importlib

EXTRA_SUBCOMMANDS = {
    "serve": ("grpo_lightning.inference.server", "built-in OpenAI-compatible inference server"),
    "sweep": ("grpo_lightning.sweep", "grid or random hyperparameter sweeps of fit runs"),
    "plot": ("grpo_lightning.plot", "learning curves of run directories"),
    "export": ("grpo_lightning.lora", "merge a LoRA checkpoint's adapter into its base model"),
}


def run_extra(args: list[str]) -> int | None:
    """Run ``args`` if it names one of ``EXTRA_SUBCOMMANDS`` and return its exit code, else None."""
    if not args or args[0] not in EXTRA_SUBCOMMANDS:
        return None
    module = importlib.import_module(EXTRA_SUBCOMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)
