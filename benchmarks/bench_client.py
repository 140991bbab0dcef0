"""CPU cost of the rollout client per request: what the openai SDK adds over posting the same
JSON with httpx and parsing it ourselves, for answers the size training sees.

    uv run python benchmarks/bench_client.py
    uv run python benchmarks/bench_client.py --requests 128 --repeats 5

No server and no network: both paths get the same recorded vLLM answer from an
``httpx.MockTransport``, so the numbers are the client's own CPU time in this process (CPU
seconds: no benchmark lock needed). ``sdk`` is ``RolloutClient`` as the trainer uses it
(``completions.create`` with the prompt in ``extra_body``, the answer read as JSON);
``models`` is how it called the SDK before (the prompt as the declared argument, which the SDK
converts token by token, and the answer built into the SDK's models, then dumped); ``raw`` is
the floor: the same body posted with a bare ``httpx.AsyncClient`` and parsed by
``parse_openai``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable

import httpx

from grpo_lightning.inference.client import (
    GenerationRequest,
    RolloutClient,
    SamplingParams,
    openai_payload,
    parse_openai,
)


def answer(prompt: list[int], n: int, tokens: int) -> bytes:
    """A vLLM ``/v1/completions`` answer with ``return_token_ids`` and ``logprobs: 0``."""
    choice = {
        "finish_reason": "length", "stop_reason": None, "text": "x" * tokens, "prompt_logprobs": None,
        "logprobs": {"text_offset": list(range(tokens)), "token_logprobs": [-0.5] * tokens,
                     "tokens": ["x"] * tokens, "top_logprobs": [{"x": -0.5}] * tokens},
        "token_ids": [7] * tokens, "prompt_token_ids": prompt,
    }
    body = {"id": "cmpl", "object": "text_completion", "created": 0, "model": "m", "usage": None,
            "choices": [{"index": i, **choice} for i in range(n)]}
    return json.dumps(body).encode()


class ModelsClient(RolloutClient):
    """The client's OpenAI path before: every field the SDK declares (the prompt too) as its
    argument, the answer parsed into the SDK's models and dumped back to a dict."""

    async def _call(self, sdk, url, req):
        extra = openai_payload(req, self.model)
        declared = {k: extra.pop(k) for k in list(extra) if k in self._sdk_fields}
        answer = await sdk.completions.create(**declared, extra_body=extra, extra_headers=self._sdk_headers)
        return parse_openai(answer.model_dump(warnings=False), req, self.tokenizer)


async def raw(requests: list[GenerationRequest], transport: httpx.MockTransport) -> None:
    async with httpx.AsyncClient(transport=transport) as http:
        async def one(req: GenerationRequest) -> None:
            r = await http.post("http://gpu:8000/v1/completions", json=openai_payload(req, "m"))
            parse_openai(r.json(), req)

        await asyncio.gather(*(one(r) for r in requests))


def cpu_ms_per_request(runs: dict[str, Callable[[], None]], requests: int, repeats: int) -> dict[str, float]:
    """The best CPU milliseconds per request of each run over ``repeats`` rounds; every round
    times each run once, so a change in the machine's load hits all of them alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.process_time()
            run()
            best[name] = min(best[name], time.process_time() - t0)
    return {name: 1000 * seconds / requests for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shapes = [(4, 1, 2), (300, 8, 200), (300, 8, 1000)]  # (prompt tokens, n, completion tokens)
    print(f"{'prompt':>6} {'n':>3} {'tokens':>6} | {'models ms/req':>13} {'sdk ms/req':>10} {'raw ms/req':>10} {'sdk/raw':>7}")
    for prompt_len, n, tokens in shapes:
        prompt = list(range(1000, 1000 + prompt_len))
        body = answer(prompt, n, tokens)
        transport = httpx.MockTransport(
            lambda _req, body=body: httpx.Response(200, content=body, headers={"content-type": "application/json"})
        )
        reqs = [GenerationRequest(prompt, n, i, SamplingParams(max_tokens=tokens)) for i in range(args.requests)]
        client = RolloutClient(["http://gpu:8000"], backend="vllm", model="m", transport=transport)
        before = ModelsClient(["http://gpu:8000"], backend="vllm", model="m", transport=transport)
        # One warm-up each, then the timed rounds interleaved: all paths see the same load on
        # a shared machine.
        client.generate(reqs[:2])
        before.generate(reqs[:2])
        asyncio.run(raw(reqs[:2], transport))
        ms = cpu_ms_per_request(
            {"models": lambda: before.generate(reqs), "sdk": lambda: client.generate(reqs),  # noqa: B023
             "raw": lambda: asyncio.run(raw(reqs, transport))},  # noqa: B023
            args.requests,
            args.repeats,
        )
        sdk_ms, raw_ms = ms["sdk"], ms["raw"]
        print(f"{prompt_len:>6} {n:>3} {tokens:>6} | {ms['models']:>13.2f} {sdk_ms:>10.2f} {raw_ms:>10.2f} {sdk_ms / raw_ms:>7.2f}")


if __name__ == "__main__":
    main()
