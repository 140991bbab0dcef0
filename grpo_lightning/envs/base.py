"""The environment interface: what a task must provide to be trained on.

A task plugs into the trainer by subclassing :class:`Environment` and registering itself in
``grpo_lightning.envs.ENVIRONMENTS``. The trainer never looks inside a task: it asks for a
prompt from a seed and for a score of a completion text.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class StepResult:
    """The score of one completion."""

    reward: float
    """Total reward: the weighted sum of ``components``."""
    components: dict[str, float]
    """Each reward component already multiplied by its weight, so they add up to ``reward``."""
    success: bool
    """Whether the completion solves the task (the metric that pass@k counts)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Task-specific details for logging (parsed answer, problem size, ...)."""


class Environment(ABC):
    """A single-turn task: ``reset(seed)`` draws a problem, ``step(text)`` scores an answer.

    ``step`` does not advance any state, so the same problem can score all G completions of a
    GRPO group. Implementations must be deterministic: the same seed gives the same problem
    on every machine and Python version.
    """

    name: str = "base"

    @abstractmethod
    def reset(self, seed: int) -> list[Message]:
        """Draw the problem for ``seed`` and return its chat prompt (system and user turns)."""

    @abstractmethod
    def step(self, completion: str) -> StepResult:
        """Score ``completion`` (the decoded text, special tokens removed) for the current problem.

        The reward must be finite for any text. A NaN or infinite reward is not trained on: the
        trainer scores that completion as ``reward_bounds[0]`` (components all 0, no success),
        warns with the problem seed and counts it in the ``reward/nonfinite`` metric.
        """

    @property
    @abstractmethod
    def reward_bounds(self) -> tuple[float, float]:
        """The lowest and highest reward ``step`` can return."""

    @property
    @abstractmethod
    def component_names(self) -> tuple[str, ...]:
        """Names of the reward components, in the order they are reported."""

    def accepts(self, seed: int) -> bool:
        """Whether ``seed`` belongs to this environment's problem distribution.

        Environments that restrict their distribution (for example to satisfiable or
        easy problems) return False for the seeds they exclude; the data module skips them.
        """
        return True
