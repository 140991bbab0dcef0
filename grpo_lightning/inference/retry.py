"""The one retry policy for requests to the inference servers, built on ``tenacity``.

Generation requests (``client``), weight-sync requests (``weight_sync``) and the health polling
of a starting server (``launch``) all retry the same way: an attempt that failed in a way a
later one may not (no answer, a timeout, an overloaded server) is tried again after a pause of
``backoff`` seconds that grows ``growth``-fold per retry up to ``max_backoff``, at most
``max_retries`` times, and never once the next attempt would start more than ``deadline``
seconds after the first. A failure of any other kind is raised at once. When the policy gives
up, the caller's own one-line error is raised, written from the last failure and the number of
attempts (``give_up``).

What stays with its caller is domain logic, not retrying: which URL an attempt goes to, which
failures count as retryable, and restarting a server that stays down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import tenacity

if TYPE_CHECKING:
    from .launch import ServerConfig

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to try again. Its fields are positional in this order, so
    ``RetryPolicy(max_retries, backoff)`` reads like the ``data.server`` knobs it comes from."""

    max_retries: int | None = 0
    """Attempts after the first failed one; None: no limit but the deadline."""
    backoff: float = 0.5
    """Seconds before the first retry."""
    max_backoff: float = 30.0
    """The longest pause between two attempts."""
    growth: float = 2.0
    """Factor by which each pause exceeds the one before."""
    deadline: float | None = None
    """Seconds after the first attempt's start past which no attempt starts; None: no deadline."""

    def __post_init__(self) -> None:
        if self.max_retries is None and self.deadline is None:
            raise ValueError("a RetryPolicy needs max_retries or a deadline: it would never give up")

    @classmethod
    def from_config(cls, config: ServerConfig) -> RetryPolicy:
        """The retry budget ``data.server`` sets (``max_retries``, ``backoff``) for requests
        to its servers."""
        return cls(config.max_retries, config.backoff)

    def pause(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (1 for the first)."""
        return min(self.backoff * self.growth ** (retry - 1), self.max_backoff)

    def call(
        self,
        attempt: Callable[[int], T],
        retry_on: type[BaseException] | tuple[type[BaseException], ...],
        give_up: Callable[[BaseException, int], BaseException],
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> T:
        """``attempt(n)`` for n = 1, 2, ... until it returns or fails with anything but
        ``retry_on``; when the policy gives up, ``give_up(last failure, attempts made)`` is raised."""
        try:
            for state in tenacity.Retrying(sleep=sleep, **self._tenacity(retry_on, clock)):
                with state:
                    return attempt(state.retry_state.attempt_number)
        except tenacity.RetryError as exc:
            raise _given_up(exc, give_up) from exc.last_attempt.exception()
        raise AssertionError("unreachable: tenacity returns or raises")

    async def acall(
        self,
        attempt: Callable[[int], Awaitable[T]],
        retry_on: type[BaseException] | tuple[type[BaseException], ...],
        give_up: Callable[[BaseException, int], BaseException],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> T:
        """``call`` for a coroutine: the pauses do not block the event loop."""
        try:
            async for state in tenacity.AsyncRetrying(sleep=sleep, **self._tenacity(retry_on, clock)):
                with state:
                    return await attempt(state.retry_state.attempt_number)
        except tenacity.RetryError as exc:
            raise _given_up(exc, give_up) from exc.last_attempt.exception()
        raise AssertionError("unreachable: tenacity returns or raises")

    def _tenacity(self, retry_on, clock: Callable[[], float]) -> dict:
        stop = tenacity.stop_never
        if self.max_retries is not None:
            stop = tenacity.stop_after_attempt(self.max_retries + 1)
        if self.deadline is not None:
            stop = stop | _StopAtDeadline(clock() + self.deadline, clock)
        return {
            "retry": tenacity.retry_if_exception_type(retry_on),
            "wait": lambda state: self.pause(state.attempt_number),
            "stop": stop,
        }


class _StopAtDeadline(tenacity.stop.stop_base):
    """Give up when the next attempt would start at or after ``at`` on ``clock`` (tenacity's own
    ``stop_before_delay`` reads the wall clock, which a test cannot move)."""

    def __init__(self, at: float, clock: Callable[[], float]) -> None:
        self.at, self.clock = at, clock

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        return self.clock() + state.upcoming_sleep >= self.at


def _given_up(exc: tenacity.RetryError, give_up: Callable[[BaseException, int], BaseException]) -> BaseException:
    failure = exc.last_attempt.exception()
    assert failure is not None
    return give_up(failure, exc.last_attempt.attempt_number)
