"""RolloutClient: vLLM / SGLang wire formats (recorded answers) and fault handling.

vLLM and SGLang cannot run here, so their request bodies are checked as built and their
answers are recorded shapes from their documentation, served through ``httpx.MockTransport``.
Faults the real server cannot produce on demand (slowness, 5xx) come from a tiny fake
server; a real server killed mid-batch is covered in ``test_inference_launch.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn

from grpo_lightning.inference.client import (
    GenerationError,
    GenerationRequest,
    RolloutClient,
    SamplingParams,
    ServerUnavailable,
)
from grpo_lightning.inference.launch import free_port

PROMPT = [9707, 11, 1879, 374]
EOS = 151645

# vLLM >= 0.10 answer to /v1/completions with return_token_ids=true, logprobs=0, n=2.
VLLM_ANSWER = {
    "id": "cmpl-5f0a3c1c2c7e4f0b",
    "object": "text_completion",
    "created": 1735000000,
    "model": "Qwen/Qwen2.5-1.5B-Instruct",
    "choices": [
        {
            "index": 1,
            "text": " Lyon",
            "logprobs": {
                "text_offset": [0, 5],
                "token_logprobs": [-2.25, -0.5],
                "tokens": [" Lyon", ""],
                "top_logprobs": [{" Lyon": -2.25}, {"": -0.5}],
            },
            "finish_reason": "stop",
            "stop_reason": None,
            "token_ids": [55856, EOS],
            "prompt_logprobs": None,
            "prompt_token_ids": PROMPT,
        },
        {
            "index": 0,
            "text": " Paris is",
            "logprobs": {
                "text_offset": [0, 6],
                "token_logprobs": [-0.125, -1.0],
                "tokens": [" Paris", " is"],
                "top_logprobs": [{" Paris": -0.125}, {" is": -1.0}],
            },
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": [12095, 374],
            "prompt_logprobs": None,
            "prompt_token_ids": PROMPT,
        },
    ],
    "service_tier": None,
    "system_fingerprint": None,
    "usage": {
        "prompt_tokens": 4,
        "total_tokens": 8,
        "completion_tokens": 4,
        "prompt_tokens_details": None,
    },
    "kv_transfer_params": None,
}

# SGLang answer to a batched /generate with return_logprob=true: one item per input.
SGLANG_ANSWER = [
    {
        "text": " Paris.",
        "output_ids": [12095, 13, EOS],
        "meta_info": {
            "id": "b1e1d5",
            "finish_reason": {"type": "stop", "matched": EOS},
            "prompt_tokens": 4,
            "completion_tokens": 3,
            "cached_tokens": 0,
            "output_token_logprobs": [
                [-0.25, 12095, None],
                [-0.0625, 13, None],
                [-0.001, EOS, None],
            ],
            "e2e_latency": 0.04,
        },
    },
    {
        "text": " Lyon is",
        "output_ids": [55856, 374],
        "meta_info": {
            "id": "b1e1d6",
            "finish_reason": {"type": "length", "length": 2},
            "prompt_tokens": 4,
            "completion_tokens": 2,
            "cached_tokens": 4,
            "output_token_logprobs": [[-3.0, 55856, None], [-0.75, 374, None]],
            "e2e_latency": 0.04,
        },
    },
]


def request(n: int = 2, seed: int = 7, **params) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=PROMPT, n=n, seed=seed, params=SamplingParams(**{"max_tokens": 2, **params})
    )


class Recorder:
    """A MockTransport handler that records bodies and replays scripted answers."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[tuple[str, str, dict | None]] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content) if req.content else None
        self.calls.append((req.url.host, req.url.path, body))
        if req.url.path == "/v1/models":
            return httpx.Response(
                200, json={"object": "list", "data": [{"id": "served-name", "object": "model"}]}
            )
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        status, payload = answer
        return httpx.Response(status, json=payload)


def test_vllm_request_and_recorded_answer():
    rec = Recorder((200, VLLM_ANSWER))
    client = RolloutClient(["http://gpu:8000/"], backend="vllm", transport=httpx.MockTransport(rec))
    out = client.generate([request(temperature=0.7, top_k=0, stop_token_ids=[13])])[0]
    assert [c[1] for c in rec.calls] == ["/v1/models", "/v1/completions"]
    body = rec.calls[1][2]
    assert body == {
        "model": "served-name",
        "prompt": PROMPT,
        "n": 2,
        "seed": 7,
        "max_tokens": 2,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": -1,
        "logprobs": 0,
        "return_token_ids": True,
        "skip_special_tokens": True,
        "stop_token_ids": [13],
    }
    assert [c.token_ids for c in out] == [[12095, 374], [55856, EOS]]  # ordered by choice index
    assert [c.logprobs for c in out] == [[-0.125, -1.0], [-2.25, -0.5]]
    assert [c.finish_reason for c in out] == ["length", "stop"]
    assert [c.text for c in out] == [" Paris is", " Lyon"]
    assert all(c.prompt_ids == PROMPT for c in out)


def test_vllm_answer_problems_are_errors_not_empty_completions():
    bad_prompt = json.loads(json.dumps(VLLM_ANSWER))
    bad_prompt["choices"][0]["prompt_token_ids"] = [1, 2]
    no_ids = json.loads(json.dumps(VLLM_ANSWER))
    del no_ids["choices"][0]["token_ids"]
    short = json.loads(json.dumps(VLLM_ANSWER))
    short["choices"][1]["logprobs"]["token_logprobs"] = [-0.1]
    for answer, match in [
        (bad_prompt, "different prompt"),
        (no_ids, "token_ids"),
        (short, "logprob"),
    ]:
        client = RolloutClient(
            ["http://gpu:8000"],
            backend="vllm",
            model="m",
            transport=httpx.MockTransport(Recorder((200, answer))),
        )
        with pytest.raises(GenerationError, match=match):
            client.generate([request()])


def test_answers_that_are_not_completions_are_errors_not_retried():
    for answer, match in [
        (httpx.Response(200, text="oops"), "no completions object: oops"),
        (httpx.Response(200, json=[1, 2]), r"no completions object: \[1, 2\]"),
        (httpx.Response(200, content=b"{bad", headers={"content-type": "application/json"}), "invalid JSON"),
    ]:
        calls: list[int] = []

        def handler(req: httpx.Request, answer=answer, calls=calls) -> httpx.Response:
            calls.append(1)
            return answer

        client = RolloutClient(["http://gpu:8000"], backend="vllm", model="m", transport=httpx.MockTransport(handler))
        with pytest.raises(GenerationError, match=match):
            client.generate([request()])
        assert len(calls) == 1


def test_sglang_request_and_recorded_answer():
    rec = Recorder((200, SGLANG_ANSWER))
    client = RolloutClient(
        ["http://gpu:30000"], backend="sglang", transport=httpx.MockTransport(rec)
    )
    out = client.generate([request(seed=40, top_k=20, top_p=0.9, max_tokens=3)])[0]
    ((_, path, body),) = rec.calls
    assert path == "/generate"
    assert body["input_ids"] == [PROMPT, PROMPT] and body["return_logprob"] is True
    assert [p["sampling_seed"] for p in body["sampling_params"]] == [40, 41]  # one seed per sample
    assert body["sampling_params"][0] == {
        "max_new_tokens": 3,
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 20,
        "skip_special_tokens": True,
        "sampling_seed": 40,
    }
    assert [c.token_ids for c in out] == [[12095, 13, EOS], [55856, 374]]
    assert [c.logprobs for c in out] == [[-0.25, -0.0625, -0.001], [-3.0, -0.75]]
    assert [c.finish_reason for c in out] == ["stop", "length"]
    assert out[0].text == " Paris."


class Decoder:
    def decode(self, ids, skip_special_tokens=True):
        return "|".join(str(i) for i in ids if not (skip_special_tokens and i == EOS))


def test_sglang_without_text_decodes_with_the_tokenizer_and_checks_consistency():
    no_text = json.loads(json.dumps(SGLANG_ANSWER))
    for item in no_text:
        del item["text"]
    client = RolloutClient(
        ["http://gpu:30000"],
        backend="sglang",
        tokenizer=Decoder(),
        transport=httpx.MockTransport(Recorder((200, no_text))),
    )
    assert [c.text for c in client.generate([request(max_tokens=3)])[0]] == [
        "12095|13",
        "55856|374",
    ]
    with pytest.raises(GenerationError, match="tokenizer"):
        RolloutClient(
            ["http://gpu:30000"],
            backend="sglang",
            transport=httpx.MockTransport(Recorder((200, no_text))),
        ).generate([request(max_tokens=3)])
    mismatch = json.loads(json.dumps(SGLANG_ANSWER))
    mismatch[0]["output_ids"] = [1, 2, 3]
    with pytest.raises(GenerationError, match="disagree"):
        RolloutClient(
            ["http://gpu:30000"],
            backend="sglang",
            transport=httpx.MockTransport(Recorder((200, mismatch))),
        ).generate([request(max_tokens=3)])


def test_sglang_abort_is_retried():
    aborted = json.loads(json.dumps(SGLANG_ANSWER))
    aborted[0]["meta_info"]["finish_reason"] = {
        "type": "abort",
        "message": "weights are being updated",
    }
    rec = Recorder((200, aborted), (200, SGLANG_ANSWER))
    client = RolloutClient(
        ["http://gpu:30000"], backend="sglang", backoff=0.01, transport=httpx.MockTransport(rec)
    )
    assert client.generate([request(max_tokens=3)])[0][1].token_ids == [55856, 374]
    assert len(rec.calls) == 2


def test_5xx_and_connection_errors_are_retried_4xx_are_not():
    flaky = Recorder(
        (503, {"error": "overloaded"}), httpx.ConnectError("refused"), (200, VLLM_ANSWER)
    )
    client = RolloutClient(
        ["http://a:1"],
        backend="vllm",
        model="m",
        backoff=0.01,
        transport=httpx.MockTransport(flaky),
    )
    assert len(client.generate([request()])[0]) == 2
    assert len(flaky.calls) == 3
    rejected = Recorder((400, {"error": {"message": "max_tokens too large"}}))
    client = RolloutClient(
        ["http://a:1"],
        backend="vllm",
        model="m",
        backoff=0.01,
        transport=httpx.MockTransport(rejected),
    )
    # A rejected request is the caller's to fix: one attempt, and not a dead server.
    with pytest.raises(GenerationError, match="rejected the request: HTTP 400 .*max_tokens too large"):
        client.generate([request()])
    assert len(rejected.calls) == 1


def test_requests_spread_over_urls_and_fail_over():
    calls: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req.url.host)
        if req.url.host == "down":
            raise httpx.ConnectError("connection refused")
        body = json.loads(req.content)
        answer = json.loads(json.dumps(VLLM_ANSWER))
        answer["choices"] = answer["choices"][1:] if body["n"] == 1 else answer["choices"]
        return httpx.Response(200, json=answer)

    client = RolloutClient(
        ["http://a:1", "http://b:1"],
        backend="builtin",
        model="m",
        transport=httpx.MockTransport(handler),
    )
    done: list[int] = []
    out = client.generate([request(n=1) for _ in range(8)], on_done=done.append)
    assert len(out) == 8 and sorted(done) == list(range(8))
    assert calls.count("a") == calls.count("b") == 4
    calls.clear()
    client = RolloutClient(
        ["http://down:1", "http://b:1"],
        backend="builtin",
        model="m",
        backoff=0.01,
        transport=httpx.MockTransport(handler),
    )
    assert len(client.generate([request(n=1) for _ in range(6)])) == 6
    assert calls.count("b") == 6


def test_down_server_fails_fast_with_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    client = RolloutClient([url], max_retries=2, backoff=0.05, request_timeout=2)
    with pytest.raises(ServerUnavailable, match="after 3 attempts") as err:
        client.generate([request()])
    assert url in str(err.value)
    with pytest.raises(ServerUnavailable, match=url) as down:
        client.health()
    assert "\n" not in str(down.value)


class FakeServer:
    """A real HTTP server whose answers are scripted: delays and statuses on demand."""

    def __init__(self, script):
        self.script = script  # (path, hit number) -> (delay_s, status, json)
        self.hits = 0
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=self.port, log_level="error", interface="asgi3"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def app(self, scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/health":
            delay, status, payload = 0, 200, {"status": "ok"}
        else:
            delay, status, payload = self.script(scope["path"], self.hits)
            self.hits += 1
        await asyncio.sleep(delay)
        body = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=5)


def test_slow_server_times_out_then_retries_succeed():
    def script(path, hit):
        return (1.0, 200, VLLM_ANSWER) if hit < 4 else (0.0, 200, VLLM_ANSWER)

    fake = FakeServer(script)
    with fake as url:
        client = RolloutClient([url], model="m", request_timeout=0.3, max_retries=1, backoff=0.01)
        with pytest.raises(ServerUnavailable, match="no answer within 0.3s"):
            client.generate([request()])
        assert fake.hits == 2  # the first try and its one retry, each cut at the timeout
        client = RolloutClient([url], model="m", request_timeout=0.3, max_retries=3, backoff=0.01)
        assert [c.token_ids for c in client.generate([request()])[0]] == [
            [12095, 374],
            [55856, EOS],
        ]
        assert fake.hits == 5  # two more timeouts, then the retry that got an answer
        client.health()


def test_server_errors_exhaust_retries_into_an_exception():
    fake = FakeServer(lambda path, hit: (0.0, 500, {"error": {"message": "CUDA out of memory"}}))
    with fake as url:
        client = RolloutClient([url], model="m", max_retries=3, backoff=0.01)
        with pytest.raises(ServerUnavailable, match="HTTP 500.*CUDA out of memory"):
            client.generate([request()])
    assert fake.hits == 4  # the first try and max_retries retries


def test_generate_works_inside_a_running_event_loop():
    rec = Recorder((200, VLLM_ANSWER))
    client = RolloutClient(["http://gpu:8000"], model="m", transport=httpx.MockTransport(rec))

    async def inside():
        return client.generate([request()])

    assert len(asyncio.run(inside())[0]) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        RolloutClient(["http://x"], backend="tgi")
    with pytest.raises(ValueError, match="URL"):
        RolloutClient([])
    with pytest.raises(GenerationError, match="n and max_tokens"):
        RolloutClient(["http://x"], transport=httpx.MockTransport(Recorder((200, {})))).generate(
            [request(n=0)]
        )
