"""Task environments. Add a task by subclassing ``Environment`` and registering it here."""

from __future__ import annotations

from typing import Any

from .base import Environment, Message, StepResult
from .sat import SATEnv

ENVIRONMENTS: dict[str, type[Environment]] = {"sat": SATEnv}


def make_env(name: str, **kwargs: Any) -> Environment:
    """Instantiate the environment registered as ``name`` with its keyword options."""
    try:
        cls = ENVIRONMENTS[name]
    except KeyError:
        raise ValueError(f"unknown environment {name!r}; known: {sorted(ENVIRONMENTS)}") from None
    return cls(**kwargs)


__all__ = ["ENVIRONMENTS", "Environment", "Message", "SATEnv", "StepResult", "make_env"]
