"""The built-in server, driven by the official ``openai`` client, raw HTTP and our client.

One real server process (tiny-sat, CPU, fp32) serves the whole module. Every answer is
checked against a local forward pass of the same weights.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import openai
import pytest
import torch
from helpers import pid_alive
from test_inference_sampling import reference

from grpo_lightning.envs.sat import SATEnv
from grpo_lightning.inference.client import GenerationRequest, SamplingParams
from grpo_lightning.inference.launch import ManagedServer, ServerConfig
from grpo_lightning.inference.weight_sync import WeightSyncError, sync_weights
from grpo_lightning.inference.weights import folder_checksum
from grpo_lightning.models import load_policy

API_KEY = "test-key"
MAX_BYTES = 1 << 20
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(
        api_key=API_KEY,
        startup_timeout=120,
        extra_args=[
            "--max-request-bytes",
            str(MAX_BYTES),
            "--max-n",
            "16",
            "--max-prompts",
            "8",
            "--num-threads",
            "1",
        ],
    )
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ManagedServer(config, model="tiny-sat", log_path=log) as s:
        yield s
        pid = s.pid
    assert not pid_alive(pid), "the server outlived its ManagedServer"


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.urls[0]


@pytest.fixture(scope="module")
def oai(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    env = SATEnv()
    texts = [
        tiny_tokenizer.apply_chat_template(env.reset(s), add_generation_prompt=True, tokenize=False)
        for s in range(12)
    ]
    return [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def logits_of(model, ids: list[int]) -> torch.Tensor:
    # One thread: with the server process on the same two cores, two spinning OpenMP
    # threads make this forward pass ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        torch.set_num_threads(threads)


def local_logprobs(model, prompt, tokens, temperature=1.0, top_k=0, top_p=1.0) -> list[float]:
    """The processed-distribution logprob of each token, from one full forward pass."""
    logits = logits_of(model, prompt + tokens)
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    return [
        reference(row.tolist(), temperature, top_k, top_p)[t]
        for row, t in zip(rows, tokens, strict=True)
    ]


def post(url: str, body, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 2, 1.0), (1.4, 0, 0.7), (1.2, 3, 0.9)],
)
def test_openai_client_tokens_and_logprobs_match_a_local_forward(
    oai, tiny_model, prompts, temperature, top_k, top_p
):
    worst_raw = 0.0
    for i, prompt in enumerate(prompts[:4]):
        resp = oai.completions.create(
            model="tiny-sat",
            prompt=prompt,
            max_tokens=24,
            temperature=temperature,
            top_p=top_p,
            seed=100 + i,
            logprobs=0,
            extra_body={"top_k": top_k, "return_token_ids": True},
        )
        choice = resp.choices[0]
        tokens, served = choice.token_ids, choice.logprobs.token_logprobs
        assert choice.prompt_token_ids == prompt and len(tokens) == len(served) >= 1
        want = local_logprobs(tiny_model, prompt, tokens, temperature, top_k, top_p)
        assert all(math.isfinite(w) for w in want), "sampled a token outside top-k/top-p"
        assert max(abs(a - b) for a, b in zip(served, want, strict=True)) < 1e-4
        raw = local_logprobs(tiny_model, prompt, tokens, temperature)
        worst_raw = max(worst_raw, max(abs(a - b) for a, b in zip(served, raw, strict=True)))
    if top_k or top_p < 1:
        # The served logprobs are those of the filtered distribution, not of the tempered one.
        assert worst_raw > 1e-3


def test_temperature_zero_is_greedy_with_untempered_logprobs(oai, tiny_model, prompts):
    prompt = prompts[0]
    resp = oai.completions.create(
        model="tiny-sat",
        prompt=prompt,
        max_tokens=30,
        temperature=0,
        logprobs=0,
        extra_body={"return_token_ids": True},
    )
    tokens = resp.choices[0].token_ids
    # Teacher forcing: each greedy token is the argmax after its prefix.
    logits = logits_of(tiny_model, prompt + tokens)[len(prompt) - 1 : -1]
    assert logits.argmax(-1).tolist() == tokens
    served = resp.choices[0].logprobs.token_logprobs
    assert (
        max(
            abs(a - b)
            for a, b in zip(served, local_logprobs(tiny_model, prompt, tokens), strict=True)
        )
        < 1e-4
    )


def test_n_samples_choice_i_with_seed_plus_i(url, prompts):
    body = {
        "model": "tiny-sat",
        "prompt": prompts[1],
        "max_tokens": 16,
        "temperature": 1.5,
        "seed": 40,
        "return_token_ids": True,
    }
    many = post(url, {**body, "n": 4}).json()["choices"]
    assert [c["index"] for c in many] == [0, 1, 2, 3]
    assert len({tuple(c["token_ids"]) for c in many}) > 1
    for i, choice in enumerate(many):
        single = post(url, {**body, "seed": 40 + i}).json()["choices"][0]
        assert single["token_ids"] == choice["token_ids"]


def test_several_prompts_text_prompts_and_usage(url, prompts, tiny_tokenizer):
    body = {"prompt": prompts[:2], "n": 2, "max_tokens": 8, "seed": 5, "return_token_ids": True}
    answer = post(url, body).json()
    choices = answer["choices"]
    assert [c["prompt_token_ids"] for c in choices] == [
        prompts[0],
        prompts[0],
        prompts[1],
        prompts[1],
    ]
    assert answer["usage"]["prompt_tokens"] == len(prompts[0]) + len(prompts[1])
    assert answer["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)
    text = tiny_tokenizer.decode(prompts[0])
    by_text = post(url, {**body, "prompt": text, "n": 1, "add_special_tokens": False}).json()[
        "choices"
    ][0]
    assert by_text["prompt_token_ids"] == prompts[0]
    assert by_text["token_ids"] == choices[0]["token_ids"]


def test_finish_reasons_eos_and_stop_tokens(url, prompts, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    greedy = post(
        url, {"prompt": prompts[2], "max_tokens": 60, "temperature": 0, "return_token_ids": True}
    ).json()["choices"][0]
    assert greedy["finish_reason"] == "stop" and greedy["token_ids"][-1] == eos
    assert greedy["text"] == tiny_tokenizer.decode(greedy["token_ids"], skip_special_tokens=True)
    assert tiny_tokenizer.eos_token not in greedy["text"]
    short = post(
        url, {"prompt": prompts[2], "max_tokens": 2, "temperature": 0, "return_token_ids": True}
    ).json()["choices"][0]
    assert short["finish_reason"] == "length" and short["token_ids"] == greedy["token_ids"][:2]
    stop = greedy["token_ids"][1]
    stopped = post(
        url,
        {
            "prompt": prompts[2],
            "max_tokens": 60,
            "temperature": 0,
            "stop_token_ids": [stop],
            "return_token_ids": True,
        },
    )
    choice = stopped.json()["choices"][0]
    assert (
        choice["token_ids"] == greedy["token_ids"][:2]
        and choice["finish_reason"] == "stop"
        and choice["stop_reason"] == stop
    )
    forced = post(
        url,
        {
            "prompt": prompts[2],
            "max_tokens": 40,
            "min_tokens": 40,
            "temperature": 0,
            "return_token_ids": True,
        },
    ).json()
    assert len(forced["choices"][0]["token_ids"]) == 40


def test_same_seed_same_tokens_alone_or_amid_concurrent_load(url, prompts):
    target = {
        "prompt": prompts[3],
        "max_tokens": 40,
        "temperature": 1.0,
        "seed": 1234,
        "logprobs": 0,
        "return_token_ids": True,
    }
    others = [
        {
            "prompt": prompts[4 + i % 8],
            "max_tokens": 10 + 5 * i,
            "n": 1 + i % 3,
            "temperature": 0.5 + i / 10,
            "top_k": i % 4,
            "seed": i,
            "return_token_ids": True,
        }
        for i in range(16)
    ]

    async def scenario():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as http:
            alone = (await http.post("/v1/completions", json=target)).json()
            tasks = [asyncio.create_task(http.post("/v1/completions", json=b)) for b in others[:8]]
            await asyncio.sleep(0.05)  # join a batch that is already decoding
            mid = asyncio.create_task(http.post("/v1/completions", json=target))
            tasks += [asyncio.create_task(http.post("/v1/completions", json=b)) for b in others[8:]]
            loaded = (await mid).json()
            statuses = [r.status_code for r in await asyncio.gather(*tasks)]
            return alone, loaded, statuses

    alone, loaded, statuses = asyncio.run(scenario())
    assert statuses == [200] * 16
    a, b = alone["choices"][0], loaded["choices"][0]
    assert a["token_ids"] == b["token_ids"]
    assert (
        max(
            abs(x - y)
            for x, y in zip(
                a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"], strict=True
            )
        )
        < 1e-4
    )


BAD_REQUESTS = {
    "prompt too long": ({"prompt": [1] * 600, "max_tokens": 1}, 400, 'maximum context length is 512'),
    "prompt plus max_tokens too long": ({"prompt": [1] * 500, "max_tokens": 100}, 400, '500 prompt tokens + 100 max_tokens'),
    "max_tokens zero": ({"prompt": [1, 2], "max_tokens": 0}, 400, 'max_tokens must be in [1, 512]'),
    "max_tokens huge": ({"prompt": [1, 2], "max_tokens": 10**9}, 400, 'max_tokens must be in [1, 512]'),
    "unknown model": ({"model": "gpt-17", "prompt": [1, 2]}, 404, '`gpt-17` does not exist'),
    "json list body": ([1, 2, 3], 400, 'must be a JSON object'),
    "prompt wrong type": ({"prompt": 5}, 400, 'prompt'),
    "prompt mixed types": ({"prompt": [1, "a"]}, 400, 'prompt.list[int].1'),
    "prompt bools": ({"prompt": [True, False]}, 400, 'prompt.list[int].0'),
    "empty prompt": ({"prompt": []}, 400, 'prompt must not be empty'),
    "empty text prompt": ({"prompt": ""}, 400, 'prompt must not be empty'),
    "missing prompt": ({"max_tokens": 3}, 400, 'prompt: Field required'),
    "token id out of vocabulary": ({"prompt": [1, 10**7]}, 400, 'token ids must be in [0, 464)'),
    "negative token id": ({"prompt": [1, -4]}, 400, 'token ids must be in [0, 464)'),
    "max_tokens not a number": ({"prompt": [1], "max_tokens": "many"}, 400, 'max_tokens'),
    "negative temperature": ({"prompt": [1], "temperature": -1}, 400, 'temperature must be'),
    "top_p zero": ({"prompt": [1], "top_p": 0}, 400, 'top_p must be in (0, 1]'),
    "top_k negative": ({"prompt": [1], "top_k": -5}, 400, 'top_k must be'),
    "n zero": ({"prompt": [1], "n": 0}, 400, 'n must be in [1, 16]'),
    "n above limit": ({"prompt": [1], "n": 17}, 400, 'n must be in [1, 16], got 17'),
    "too many prompts": ({"prompt": [[1]] * 9}, 400, 'at most 8 prompts'),
    "logprobs above limit": ({"prompt": [1], "logprobs": 99}, 400, 'logprobs must be in [0, 20]'),
    "stop token out of vocabulary": ({"prompt": [1], "stop_token_ids": [10**7]}, 400, 'stop_token_ids'),
    "seed out of range": ({"prompt": [1], "seed": 2**70}, 400, 'seed must fit'),
    "min_tokens above max_tokens": ({"prompt": [1], "max_tokens": 2, "min_tokens": 3}, 400, 'min_tokens must be in [0, max_tokens]'),
    "streaming": ({"prompt": [1], "stream": True}, 400, 'stream=true is not supported'),
    "stop strings": ({"prompt": [1], "stop": ["\n"]}, 400, 'stop strings are not supported'),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_a_message(url, case):
    body, status, reason = BAD_REQUESTS[case]
    r = post(url, body)
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]["message"]  # rejected for the right reason


def test_malformed_oversized_and_unknown_routes(url):
    r = httpx.post(
        f"{url}/v1/completions",
        content=b'{"prompt": [1, 2',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    big = json.dumps({"prompt": [1] * (MAX_BYTES // 2)}).encode()
    r = httpx.post(f"{url}/v1/completions", content=big, headers=AUTH, timeout=60)
    assert r.status_code == 413
    r = httpx.post(
        f"{url}/v1/completions",
        content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 413  # chunked upload: no Content-Length to check up front
    assert (
        httpx.post(
            f"{url}/update_weights_from_disk", json={"model_path": "/nowhere"}, headers=AUTH
        ).json()["success"]
        is False
    )
    assert (
        httpx.post(f"{url}/update_weights_from_disk", json={"path": 1}, headers=AUTH).status_code
        == 400
    )
    assert httpx.get(f"{url}/health").status_code == 200


def test_api_key_is_required_except_for_health(url, oai):
    assert post(url, {"prompt": [1]}, headers={}).status_code == 401
    assert post(url, {"prompt": [1]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert (
        httpx.post(f"{url}/update_weights_from_disk", json={"model_path": "/x"}).status_code == 401
    )
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny-sat", prompt=[1], max_tokens=1
        )
    assert [m.id for m in oai.models.list().data] == ["tiny-sat"]


def test_rollout_client_matches_the_openai_answers(server, oai, prompts, tiny_tokenizer):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=5)
    requests = [
        GenerationRequest(prompt_ids=p, n=3, seed=10 * i, params=params)
        for i, p in enumerate(prompts[:5])
    ]
    done: list[int] = []
    results = server.client().generate(requests, on_done=done.append)
    assert sorted(done) == list(range(5)) and [len(r) for r in results] == [3] * 5
    for i, (req, group) in enumerate(zip(requests, results, strict=True)):
        resp = oai.completions.create(
            model="tiny-sat",
            prompt=req.prompt_ids,
            n=3,
            max_tokens=20,
            temperature=0.9,
            seed=10 * i,
            logprobs=0,
            extra_body={"top_k": 5, "return_token_ids": True},
        )
        for completion, choice in zip(group, resp.choices, strict=True):
            assert completion.prompt_ids == req.prompt_ids
            assert completion.token_ids == choice.token_ids
            assert completion.logprobs == pytest.approx(choice.logprobs.token_logprobs, abs=1e-4)
            assert completion.text == tiny_tokenizer.decode(
                completion.token_ids, skip_special_tokens=True
            )
            assert completion.finish_reason in ("stop", "length")


def test_update_weights_from_disk_swaps_weights_between_sequences(
    url, server, tiny_sat_path, tiny_model, prompts, tmp_path
):
    info = httpx.get(f"{url}/get_model_info", headers=AUTH).json()
    original = info["checksum"]
    assert original == folder_checksum(tiny_sat_path, "float32")
    perturbed = load_policy(tiny_sat_path).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    perturbed.save_pretrained(tmp_path / "perturbed")
    long_body = {
        "prompt": prompts[5],
        "max_tokens": 150,
        "ignore_eos": True,
        "seed": 3,
        "logprobs": 0,
        "return_token_ids": True,
    }
    after_body = {
        "prompt": prompts[6],
        "max_tokens": 20,
        "seed": 4,
        "logprobs": 0,
        "return_token_ids": True,
    }

    async def scenario():
        finished = {}
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as http:

            async def timed(name, coro):
                r = await coro
                finished[name] = time.monotonic()
                return r.json()

            running = asyncio.create_task(
                timed("long", http.post("/v1/completions", json=long_body))
            )
            while (await http.get("/get_model_info")).json()["running"] == 0:
                await asyncio.sleep(0.005)
            update = asyncio.create_task(
                timed(
                    "update",
                    http.post(
                        "/update_weights_from_disk",
                        json={"model_path": str(tmp_path / "perturbed")},
                    ),
                )
            )
            # The next request must arrive while the swap waits (loading the folder takes a
            # while on a loaded machine): poll for it instead of guessing a delay.
            while not (await http.get("/get_model_info")).json()["swap_pending"]:
                assert not update.done(), "the update finished while the long request was still running"
                await asyncio.sleep(0.005)
            queued = asyncio.create_task(
                timed("queued", http.post("/v1/completions", json=after_body))
            )
            return await running, await update, await queued, finished

    try:
        long, update, queued, finished = asyncio.run(scenario())
        assert update["success"] is True
        assert update["checksum"] != original and update["checksum"] == folder_checksum(
            tmp_path / "perturbed", "float32"
        )
        assert finished["update"] >= finished["long"], (
            "the update answered before in-flight work finished"
        )
        # The in-flight sequence ran on the old weights from its first token to its last ...
        choice = long["choices"][0]
        old = local_logprobs(tiny_model, prompts[5], choice["token_ids"])
        assert (
            max(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"], old, strict=True))
            < 1e-4
        )
        # ... and the one that arrived during the swap entirely on the new ones.
        choice = queued["choices"][0]
        new = local_logprobs(perturbed, prompts[6], choice["token_ids"])
        assert (
            max(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"], new, strict=True))
            < 1e-4
        )
        assert (
            max(
                abs(a - b)
                for a, b in zip(
                    local_logprobs(tiny_model, prompts[6], choice["token_ids"]), new, strict=True
                )
            )
            > 1e-3
        )
        assert (
            long["system_fingerprint"] == original
            and queued["system_fingerprint"] == update["checksum"]
        )
        assert (
            httpx.get(f"{url}/get_model_info", headers=AUTH).json()["weights_version"]
            == info["weights_version"] + 1
        )
    finally:
        # Back to the original weights through the trainer-facing API, verified two ways.
        def probe(prompt, tokens):
            return local_logprobs(tiny_model, prompt, tokens)

        report = sync_weights(
            server, tiny_sat_path, probe=probe, probe_prompt_ids=prompts[7], tolerance=1e-4
        )
    assert report.method == "disk" and report.verified and report.checksum == original
    assert report.max_logprob_diff < 1e-4 and report.seconds > 0

    def stale_probe(prompt, tokens):
        return local_logprobs(perturbed, prompt, tokens)

    with pytest.raises(WeightSyncError, match="does not serve the trainer's weights"):
        sync_weights(
            server, tiny_sat_path, probe=stale_probe, probe_prompt_ids=prompts[7], tolerance=1e-3
        )
