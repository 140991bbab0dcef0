"""Load test of the built-in inference server: many concurrent completion requests, fired from
this process at a server running in another one, with latency percentiles and an error count.

    uv run python benchmarks/load_server.py                     # starts a tiny-sat server itself
    uv run python benchmarks/load_server.py --requests 512 --max-tokens 32
    uv run python benchmarks/load_server.py --url http://127.0.0.1:8000 --api-key KEY

Every request is a SAT prompt (as text: the server tokenizes it) with ``n=1``, its own sampling
seed and exact token ids and logprobs asked for, as the trainer asks. An error is anything but
HTTP 200 with one choice carrying as many logprobs as tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field

import httpx

from grpo_lightning.envs.sat import SATEnv


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    """Seconds from send to full answer, of the requests that succeeded."""
    errors: list[str] = field(default_factory=list)
    completion_tokens: int = 0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def sat_prompts(count: int, first_seed: int = 5000) -> list[str]:
    env = SATEnv()
    return [env.reset(first_seed + i)[-1]["content"] + "\n" for i in range(count)]


async def _fire(url: str, requests: int, concurrency: int, max_tokens: int, api_key: str | None, timeout: float) -> LoadResult:
    prompts = sat_prompts(min(requests, 64))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    start = asyncio.Event()
    result = LoadResult(requests=requests, concurrency=concurrency, seconds=0.0)

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {
            "prompt": prompts[i % len(prompts)],
            "max_tokens": max_tokens,
            "n": 1,
            "seed": i,
            "temperature": 1.0,
            "logprobs": 0,
            "return_token_ids": True,
        }
        await start.wait()  # every request leaves together: the server sees the whole burst
        async with gate:
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/completions", json=body)
            except httpx.HTTPError as exc:
                result.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                return
            latency = time.perf_counter() - t0
        if r.status_code != 200:
            result.errors.append(f"request {i}: HTTP {r.status_code} {r.text[:200]}")
            return
        choices = r.json().get("choices") or []
        if len(choices) != 1 or len(choices[0]["logprobs"]["token_logprobs"]) != len(choices[0]["token_ids"]):
            result.errors.append(f"request {i}: malformed answer {r.text[:200]}")
            return
        result.latencies.append(latency)
        result.completion_tokens += len(choices[0]["token_ids"])

    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as http:
        tasks = [asyncio.create_task(one(http, i)) for i in range(requests)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - t0
    return result


def run_load(
    url: str,
    requests: int = 256,
    concurrency: int | None = None,
    max_tokens: int = 16,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> LoadResult:
    """Fire ``requests`` completion requests at ``url``, ``concurrency`` at a time (all by default)."""
    return asyncio.run(_fire(url.rstrip("/"), requests, concurrency or requests, max_tokens, api_key, timeout))


def format_table(r: LoadResult) -> str:
    ms = {q: 1000 * r.percentile(q) for q in (50, 90, 99, 100)}
    rows = [
        ("requests", f"{r.requests} ({r.concurrency} concurrent)"),
        ("succeeded", str(len(r.latencies))),
        ("errors", str(len(r.errors))),
        ("wall time", f"{r.seconds:.2f} s"),
        ("throughput", f"{len(r.latencies) / r.seconds:.1f} req/s, {r.completion_tokens / r.seconds:.0f} tok/s"),
        ("latency p50", f"{ms[50]:.0f} ms"),
        ("latency p90", f"{ms[90]:.0f} ms"),
        ("latency p99", f"{ms[99]:.0f} ms"),
        ("latency max", f"{ms[100]:.0f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    lines += [f"error: {e}" for e in r.errors[:5]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server (default: start a built-in tiny-sat server)")
    p.add_argument("--model", default="tiny-sat", help="model of the server started here")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at once (default: all)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)

    server = None
    url = args.url
    if url is None:
        from grpo_lightning.inference.launch import ManagedServer, ServerConfig

        config = ServerConfig(device=args.device, api_key=args.api_key, max_num_seqs=64)
        server = ManagedServer(config, model=args.model).start()
        url = server.urls[0]
    try:
        result = run_load(url, args.requests, args.concurrency, args.max_tokens, args.api_key)
    finally:
        if server is not None:
            server.stop()
    print(f"load test of {url}: {args.requests} requests, max_tokens={args.max_tokens}")
    print(format_table(result))
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
