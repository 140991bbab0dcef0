"""Weight sync against vLLM and SGLang routes (recorded answers through httpx.MockTransport).

The built-in server's disk sync (checksum and probe verification) runs against a real server
in ``test_inference_server.py``; restart sync in ``test_inference_launch.py``.
"""

from __future__ import annotations

import json

import httpx
import pytest

from grpo_lightning.inference.client import ServerUnavailable
from grpo_lightning.inference.launch import ManagedServer, ServerConfig
from grpo_lightning.inference.retry import RetryPolicy
from grpo_lightning.inference.weight_sync import (
    DEFAULT_PROBE_PROMPT,
    WeightSyncError,
    sync_weights,
)

URL = "http://gpu:8000"
PROBE_TOKENS = [64, 293]


def vllm_probe_answer(logprobs: list[float], versions: list[str] | None) -> dict:
    """vLLM 0.33's ``CompletionResponse`` to the probe (``logprobs: 0``, ``return_token_ids``,
    and ``return_weight_versions`` when ``versions`` is given), field for field as it serializes."""
    return {
        "id": "cmpl-9f5cbd0e6a2b4c51",
        "object": "text_completion",
        "created": 1796070000,
        "model": "policy",
        "choices": [
            {
                "index": 0,
                "text": " a b",
                "logprobs": {
                    "text_offset": [0, 2],
                    "token_logprobs": logprobs,
                    "tokens": [" a", " b"],
                    "top_logprobs": [{" a": logprobs[0]}, {" b": logprobs[1]}],
                },
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": PROBE_TOKENS,
                "prompt_logprobs": None,
                "prompt_token_ids": DEFAULT_PROBE_PROMPT,
                "routed_experts": None,
                "weight_versions": (
                    None if versions is None else [{"version": v, "start": 0, "end": 2} for v in versions]
                ),
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {
            "prompt_tokens": 8,
            "total_tokens": 10,
            "completion_tokens": 2,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


# vLLM 0.33's ``/v1/models`` (``ModelList``) for a server launched with ``--served-model-name policy``.
VLLM_MODELS_ANSWER = {
    "object": "list",
    "data": [
        {
            "id": "policy",
            "object": "model",
            "created": 1796070000,
            "owned_by": "vllm",
            "root": "/runs/r1/sync_weights",
            "parent": None,
            "max_model_len": 4096,
            "permission": [],
        }
    ],
}


def trainer_logprobs(step: int) -> list[float]:
    """The trainer's probe logprobs after ``step`` optimizer steps: one step moves them by 0.01,
    well inside the probe's tolerance (0.05), as a real step does."""
    return [-0.5 - 0.01 * step, -0.25 + 0.01 * step]


class FakeVLLM:
    """vLLM 0.33 in dev mode as the sync sees it: routes, answers and weight-version bookkeeping.

    Each reload makes the next step's weights current; ``lag`` makes generation answer from
    weights that many syncs behind (with their version label), as a replica behind a load
    balancer that the sync did not reach would; ``reset_answers`` scripts
    ``/reset_prefix_cache``; ``version_route=False`` is a vLLM before ``/update_weight_version``.
    """

    def __init__(self, lag: int = 0, reset_answers=(True,), version_route: bool = True):
        self.lag, self.version_route = lag, version_route
        self.reset_answers = list(reset_answers)
        self.steps = [("default", 0)]  # (version label, step) of each set of weights loaded
        self.calls: list[tuple[str, dict | None]] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content) if req.content else None
        path = req.url.path
        self.calls.append((path, body))
        if path == "/collective_rpc":
            self.steps.append((self.steps[-1][0], self.steps[-1][1] + 1))
            return httpx.Response(200, json={"results": [None]})  # one worker, reload returns None
        if path == "/reset_prefix_cache":
            ok = self.reset_answers.pop(0) if len(self.reset_answers) > 1 else self.reset_answers[0]
            return httpx.Response(200, json={"success": ok})
        if path == "/update_weight_version" and self.version_route:
            self.steps[-1] = (body["new_version"], self.steps[-1][1])
            return httpx.Response(200, json={"success": True, "new_version": body["new_version"]})
        if path == "/v1/models":
            return httpx.Response(200, json=VLLM_MODELS_ANSWER)
        if path == "/v1/completions":
            version, step = self.steps[max(0, len(self.steps) - 1 - self.lag)]
            versions = [version] if body.get("return_weight_versions") else None
            return httpx.Response(200, json=vllm_probe_answer(trainer_logprobs(step), versions))
        return httpx.Response(404, json={"detail": "Not Found"})

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]


class Routes:
    """Scripted answers per (path, call number); records every call."""

    def __init__(self, **answers):
        self.answers = answers
        self.calls: list[tuple[str, dict | None]] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content) if req.content else None
        self.calls.append((req.url.path, body))
        script = self.answers.get(req.url.path.strip("/"), [(404, {"detail": "Not Found"})])
        seen = sum(1 for path, _ in self.calls if path == req.url.path)
        status, payload = script[min(seen, len(script)) - 1]
        return httpx.Response(status, json=payload)


def test_vllm_reload_labels_the_weights_and_verifies_version_and_probe(tmp_path):
    server = FakeVLLM()
    seen = []

    def probe(prompt, tokens):
        seen.append((prompt, tokens))
        return [x + 1e-3 for x in trainer_logprobs(1)]

    report = sync_weights(
        [URL], tmp_path, backend="vllm", probe=probe, version="step-1", transport=httpx.MockTransport(server)
    )
    assert server.paths() == [
        "/collective_rpc",
        "/reset_prefix_cache",
        "/update_weight_version",
        "/v1/models",
        "/v1/completions",
    ]
    assert server.calls[0][1] == {
        "method": "reload_weights",
        "kwargs": {"weights_path": str(tmp_path.resolve())},
    }
    assert server.calls[2][1] == {"new_version": "step-1"}
    probe_body = server.calls[4][1]
    assert (probe_body["temperature"], probe_body["top_k"], probe_body["top_p"]) == (1.0, -1, 1.0)
    assert probe_body["return_weight_versions"] is True and probe_body["model"] == "policy"
    assert seen == [(DEFAULT_PROBE_PROMPT, PROBE_TOKENS)]
    assert (report.method, report.verified, report.weight_version) == ("reload", True, "step-1")
    assert report.max_logprob_diff == pytest.approx(1e-3)

    # Without a probe the version alone verifies; the label is unique to each sync by default.
    server = FakeVLLM()
    first = sync_weights([URL], tmp_path, backend="vllm", transport=httpx.MockTransport(server))
    second = sync_weights([URL], tmp_path, backend="vllm", transport=httpx.MockTransport(server))
    assert first.verified and second.verified
    assert first.weight_version != second.weight_version
    assert first.weight_version.startswith(tmp_path.name + "-")
    assert server.steps[1:] == [(first.weight_version, 1), (second.weight_version, 2)]

    def stale(prompt, tokens):
        return [-0.9, -0.25]

    with pytest.raises(WeightSyncError, match="does not serve the trainer's weights"):
        sync_weights([URL], tmp_path, backend="vllm", probe=stale, transport=httpx.MockTransport(FakeVLLM()))


def test_a_server_one_step_behind_is_caught_by_its_version_where_the_probe_passes(tmp_path):
    def probe_at(step):
        return lambda prompt, tokens: trainer_logprobs(step)

    # The generation replica still serves step 1 when the trainer pushes step 2.
    server = FakeVLLM()
    sync_weights([URL], tmp_path, backend="vllm", probe=probe_at(1), version="step-1", transport=httpx.MockTransport(server))
    server.lag = 1
    with pytest.raises(WeightSyncError) as err:
        sync_weights([URL], tmp_path, backend="vllm", probe=probe_at(2), version="step-2", transport=httpx.MockTransport(server))
    assert str(err.value) == (
        f"{URL} does not serve the new weights: its completion was sampled by weight version "
        "'step-1', not 'step-2'"
    )
    # The same stale server against the probe alone (a vLLM without the version route): one
    # step's logprob change is within the tolerance, so the probe lets it through.
    old = FakeVLLM(version_route=False)
    sync_weights([URL], tmp_path, backend="vllm", transport=httpx.MockTransport(old), probe=probe_at(1))
    old.lag = 1
    report = sync_weights([URL], tmp_path, backend="vllm", probe=probe_at(2), transport=httpx.MockTransport(old))
    assert report.verified and report.weight_version is None
    assert report.max_logprob_diff == pytest.approx(0.01)
    assert "return_weight_versions" not in old.calls[-1][1]


def test_reset_prefix_cache_success_false_is_retried_once_then_fails_the_sync(tmp_path):
    server = FakeVLLM(reset_answers=[False, True])
    report = sync_weights([URL], tmp_path, backend="vllm", retry=RetryPolicy(0, 0.01), transport=httpx.MockTransport(server))
    assert server.paths().count("/reset_prefix_cache") == 2 and report.verified
    server = FakeVLLM(reset_answers=[False])
    with pytest.raises(WeightSyncError, match="answered success=false twice"):
        sync_weights([URL], tmp_path, backend="vllm", retry=RetryPolicy(0, 0.01), transport=httpx.MockTransport(server))
    assert server.paths() == ["/collective_rpc", "/reset_prefix_cache", "/reset_prefix_cache"]


def test_vllm_without_a_path_argument_gets_update_config_then_reload(tmp_path):
    routes = Routes(
        collective_rpc=[
            (500, {"detail": "unexpected keyword 'weights_path'"}),
            (200, {}),
            (200, {}),
        ],
        reset_prefix_cache=[(200, {"success": True})],
    )
    with pytest.warns(UserWarning, match="not verified") as caught:
        report = sync_weights(
            [URL], tmp_path, backend="vllm", transport=httpx.MockTransport(routes)
        )
    # The warning names this call, not a line inside weight_sync.
    assert [w.filename for w in caught if "not verified" in str(w.message)] == [__file__]
    assert [body["method"] for path, body in routes.calls if path == "/collective_rpc"] == [
        "reload_weights",
        "update_config",
        "reload_weights",
    ]
    assert routes.calls[1][1]["args"] == [{"model_config": {"model": str(tmp_path.resolve())}}]
    # That vLLM predates /update_weight_version (404): nothing can verify without a probe.
    assert routes.calls[-1][0] == "/update_weight_version"
    assert report.method == "reload" and not report.verified


def test_warnings_point_at_the_caller_of_sync_weights_on_both_paths(tmp_path):
    """A vLLM that takes the version label but reports none with its completions (so nothing
    verifies a sync) and fails to unload an old adapter: every warning names the line that
    called ``sync_weights``, though the checks that raise them sit at different call depths
    on the full-weights and the adapter path."""
    routes = Routes(**{
        "collective_rpc": [(200, {"results": [None]})],
        "reset_prefix_cache": [(200, {"success": True})],
        "update_weight_version": [(200, {"success": True})],
        "v1/models": [(200, VLLM_MODELS_ANSWER)],
        "v1/completions": [(200, vllm_probe_answer(trainer_logprobs(1), None))],
        "v1/load_lora_adapter": [(200, "Success: LoRA adapter added.")],
        "v1/unload_lora_adapter": [(500, {"detail": "Internal Server Error"})],
    })
    full = tmp_path / "full"
    full.mkdir()
    adapters = []
    for i in range(2):  # the sync names an adapter after its weights' bytes and reads nothing else
        folder = tmp_path / f"adapter{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(bytes([i]))
        adapters.append(folder)
    server = ManagedServer(ServerConfig(backend="vllm", urls=["http://127.0.0.1:8000"]))  # loopback: no dev-mode warning
    transport = httpx.MockTransport(routes)
    with pytest.warns(UserWarning) as caught:
        for folder in (full, *adapters):
            assert not sync_weights(server, folder, transport=transport).verified
    kinds = ("reports no version", "not verified", "did not unload the old LoRA adapter")
    ours = [(kind, w.filename) for w in caught for kind in kinds if kind in str(w.message)]
    assert sorted(ours) == sorted([(kinds[0], __file__)] * 3 + [(kinds[1], __file__)] * 3 + [(kinds[2], __file__)])


def test_vllm_without_dev_mode_cannot_reload_an_attached_server(tmp_path):
    routes = Routes(collective_rpc=[(404, {"detail": "Not Found"})])
    with pytest.raises(WeightSyncError, match="VLLM_SERVER_DEV_MODE=1"):
        sync_weights([URL], tmp_path, backend="vllm", transport=httpx.MockTransport(routes))


def sglang_generate_item(logprobs: list[float], version: str) -> dict:
    """One item of SGLang 0.5.23's ``/generate`` answer to a batch with ``return_logprob``."""
    return {
        "text": " a b",
        "output_ids": PROBE_TOKENS,
        "meta_info": {
            "id": "5b0c0b7f61a24d0e9c1f",
            "finish_reason": {"type": "length", "length": 2},
            "prompt_tokens": 8,
            "weight_version": version,
            "num_retractions": 0,
            "reasoning_tokens": 0,
            "completion_tokens": 2,
            "cached_tokens": 0,
            "input_token_logprobs": [[None, t, None] for t in DEFAULT_PROBE_PROMPT[:1]],
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, PROBE_TOKENS, strict=True)],
            "output_token_logprobs_length": 2,
            "e2e_latency": 0.031,
        },
    }


class FakeSGLang:
    """SGLang as the sync sees it: ``/update_weights_from_disk`` moves the weights one step and
    takes ``weight_version``; ``/generate`` reports the version in ``meta_info``; ``lag`` as in
    ``FakeVLLM``."""

    def __init__(self, lag: int = 0):
        self.lag = lag
        self.steps = [("default", 0)]  # SGLang's --weight-version defaults to "default"
        self.calls: list[tuple[str, dict | None]] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content) if req.content else None
        self.calls.append((req.url.path, body))
        if req.url.path == "/update_weights_from_disk":
            version = body.get("weight_version") or self.steps[-1][0]
            self.steps.append((version, self.steps[-1][1] + 1))
            message = "Succeeded to update model weights."
            if body.get("weight_version") is not None:
                message += f" Weight version updated to {version}."
            return httpx.Response(200, json={"success": True, "message": message, "num_paused_requests": 0})
        if req.url.path == "/generate":
            version, step = self.steps[max(0, len(self.steps) - 1 - self.lag)]
            item = sglang_generate_item(trainer_logprobs(step), version)
            return httpx.Response(200, json=[item] * len(body["input_ids"]))
        return httpx.Response(404, json={"detail": "Not Found"})


def test_sglang_update_weights_from_disk_with_a_version(tmp_path):
    server = FakeSGLang()
    report = sync_weights(
        ["http://a:30000", "http://b:30000"],
        tmp_path,
        backend="sglang",
        api_key="k",
        version="step-1",
        transport=httpx.MockTransport(server),
    )
    update = {"model_path": str(tmp_path.resolve()), "weight_version": "step-1"}
    assert [c[0] for c in server.calls] == ["/update_weights_from_disk"] * 2 + ["/generate"] * 2
    assert [c[1] for c in server.calls[:2]] == [update, update]
    assert server.calls[2][1]["return_logprob"] is True
    assert (report.method, report.verified, report.weight_version) == ("disk", True, "step-1")
    assert report.max_logprob_diff is None  # no probe: verified by version alone

    server.lag = 1  # the next push does not reach the generation replica
    with pytest.raises(WeightSyncError, match="sampled by weight version 'step-1', not 'step-2'"):
        sync_weights(
            ["http://a:30000"],
            tmp_path,
            backend="sglang",
            version="step-2",
            probe=lambda prompt, tokens: trainer_logprobs(2),
            transport=httpx.MockTransport(server),
        )

    failing = Routes(
        update_weights_from_disk=[
            (400, {"success": False, "message": "Failed to get weights iterator: shape mismatch", "num_paused_requests": 0})
        ]
    )
    with pytest.raises(WeightSyncError, match="shape mismatch"):
        sync_weights(
            ["http://a:30000"], tmp_path, backend="sglang", transport=httpx.MockTransport(failing)
        )


class DownFor:
    """A server that refuses the first ``n`` connections, then answers like SGLang."""

    def __init__(self, n: int) -> None:
        self.n, self.attempts, self.server = n, 0, FakeSGLang()

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.attempts += 1
        if self.attempts <= self.n:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=req)
        return self.server(req)


def test_a_sync_the_server_does_not_answer_is_retried_within_the_budget(tmp_path):
    down = DownFor(2)
    report = sync_weights([URL], tmp_path, backend="sglang", retry=RetryPolicy(2, 0.01), transport=httpx.MockTransport(down))
    assert [c[0] for c in down.server.calls] == ["/update_weights_from_disk", "/generate"]
    assert down.attempts == 4 and report.verified
    down = DownFor(3)
    with pytest.raises(ServerUnavailable) as err:
        sync_weights([URL], tmp_path, backend="sglang", retry=RetryPolicy(2, 0.01), transport=httpx.MockTransport(down))
    assert down.attempts == 3 and not down.server.calls
    assert not isinstance(err.value, WeightSyncError)  # a lost server, as in generation: not a refusal
    assert str(err.value).startswith(f"{URL}/update_weights_from_disk got no answer after 3 attempts: ConnectError")
    # An answer, even a refusal, is not retried: the server is there and said no.
    refusing = Routes(update_weights_from_disk=[(400, {"success": False, "message": "bad folder"})])
    with pytest.raises(WeightSyncError, match="bad folder") as err:
        sync_weights([URL], tmp_path, backend="sglang", retry=RetryPolicy(2, 0.01), transport=httpx.MockTransport(refusing))
    assert not isinstance(err.value, ServerUnavailable) and len(refusing.calls) == 1


def test_methods_are_checked_against_the_backend(tmp_path):
    with pytest.raises(WeightSyncError, match="no update_weights_from_disk"):
        sync_weights([URL], tmp_path, backend="vllm", method="disk")
    with pytest.raises(WeightSyncError, match="vLLM's dev-mode route"):
        sync_weights([URL], tmp_path, backend="builtin", method="reload")
    with pytest.raises(WeightSyncError, match="ManagedServer"):
        sync_weights([URL], tmp_path, backend="builtin", method="restart")
    with pytest.raises(WeightSyncError, match="no checkpoint folder"):
        sync_weights([URL], tmp_path / "missing", backend="builtin")
    with pytest.raises(ServerUnavailable, match="got no answer after 1 attempt: ConnectError"):
        sync_weights(["http://127.0.0.1:9"], tmp_path, backend="sglang", timeout=2)
