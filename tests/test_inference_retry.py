"""The retry policy every request to a server follows: attempt counts, pauses and the deadline,
checked on a fake clock (the pauses are recorded, not slept), then through the client."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from test_inference_client import request

from grpo_lightning.inference.client import RetriesExhausted, RolloutClient
from grpo_lightning.inference.retry import RetryPolicy


class Flaky(Exception):
    pass


class FakeTime:
    """A clock that only the fake sleep and the attempts themselves move."""

    def __init__(self, attempt_cost: float = 0.0) -> None:
        self.now, self.attempt_cost = 100.0, attempt_cost
        self.pauses: list[float] = []
        self.starts: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def attempt(self, error: BaseException | None = None) -> str:
        self.starts.append(self.now)
        self.now += self.attempt_cost
        if error is not None:
            raise error
        return "ok"


class GaveUp(Exception):
    pass


def run(policy: RetryPolicy, t: FakeTime, fail: int, error: BaseException = Flaky("down")) -> str:
    return policy.call(
        lambda n: t.attempt(error if n <= fail else None),
        Flaky,
        lambda last, attempts: GaveUp(f"{attempts} attempts, last: {last}"),
        sleep=t.sleep,
        clock=t.clock,
    )


def test_attempts_are_bounded_by_max_retries_and_pauses_double_up_to_the_cap():
    t = FakeTime()
    with pytest.raises(GaveUp, match="^6 attempts, last: down$") as err:
        run(RetryPolicy(max_retries=5, backoff=0.5, max_backoff=3.0), t, fail=99)
    assert len(t.starts) == 6 and isinstance(err.value.__cause__, Flaky)
    assert t.pauses == [0.5, 1.0, 2.0, 3.0, 3.0]
    t = FakeTime()
    assert run(RetryPolicy(max_retries=2, backoff=0.25), t, fail=2) == "ok"  # the last retry succeeds
    assert t.pauses == [0.25, 0.5]
    t = FakeTime()
    with pytest.raises(GaveUp):
        run(RetryPolicy(max_retries=0), t, fail=99)
    assert (len(t.starts), t.pauses) == (1, [])


def test_other_failures_are_raised_at_once():
    t = FakeTime()
    with pytest.raises(ValueError, match="rejected"):
        run(RetryPolicy(max_retries=5), t, fail=99, error=ValueError("rejected"))
    assert (len(t.starts), t.pauses) == (1, [])


def test_no_attempt_starts_at_or_after_the_deadline():
    # Health polling's shape: no attempt limit, 0.1 s growing 1.5-fold to 0.5 s, each poll taking 0.2 s.
    t = FakeTime(attempt_cost=0.2)
    policy = RetryPolicy(max_retries=None, backoff=0.1, growth=1.5, max_backoff=0.5, deadline=3.0)
    with pytest.raises(GaveUp):
        run(policy, t, fail=10**6)
    start = 100.0
    assert t.starts[0] == start and all(s < start + 3.0 for s in t.starts)
    assert t.now - start <= 3.0  # it gave up instead of sleeping past the deadline
    assert t.now + policy.pause(len(t.starts)) >= start + 3.0  # one more attempt would have been late
    assert t.pauses[:4] == pytest.approx([0.1, 0.15, 0.225, 0.3375]) and max(t.pauses) == 0.5
    # The deadline also cuts a run whose attempt limit is far away.
    t = FakeTime(attempt_cost=1.0)
    with pytest.raises(GaveUp):
        run(RetryPolicy(max_retries=100, backoff=1.0, deadline=10.0), t, fail=10**6)
    assert t.starts == [100.0, 102.0, 105.0]  # a 4th attempt would start at 105 + 1 + 4 = 110


def test_a_policy_must_give_up_somewhere():
    with pytest.raises(ValueError, match="never give up"):
        RetryPolicy(max_retries=None)


def test_async_attempts_follow_the_same_policy():
    t = FakeTime()

    async def attempt(n: int) -> None:
        t.attempt(Flaky("down"))

    async def main() -> None:
        await RetryPolicy(max_retries=3, backoff=1.0).acall(
            attempt, Flaky, lambda last, n: GaveUp(str(n)), sleep=t.async_sleep, clock=t.clock
        )

    with pytest.raises(GaveUp, match="^4$"):
        asyncio.run(main())
    assert (len(t.starts), t.pauses) == (4, [1.0, 2.0, 4.0])


def test_the_client_sends_max_retries_plus_one_attempts_rotating_over_the_urls():
    hosts: list[str] = []

    def overloaded(req: httpx.Request) -> httpx.Response:
        hosts.append(req.url.host)
        return httpx.Response(503, json={"error": "overloaded"})

    client = RolloutClient(
        ["http://a:1", "http://b:1", "http://c:1"], model="m", max_retries=4, backoff=0.0,
        transport=httpx.MockTransport(overloaded),
    )
    with pytest.raises(RetriesExhausted, match=r"failed after 5 attempts \(http://a:1, http://b:1, http://c:1\): .*HTTP 503") as err:
        client.generate([request()])
    assert hosts == ["a", "b", "c", "a", "b"]
    assert "\n" not in str(err.value)
