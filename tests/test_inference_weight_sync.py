"""Weight sync against vLLM and SGLang routes (recorded answers through httpx.MockTransport).

The built-in server's disk sync (checksum and probe verification) runs against a real server
in ``test_inference_server.py``; restart sync in ``test_inference_launch.py``.
"""

from __future__ import annotations

import json

import httpx
import pytest

from grpo_lightning.inference.weight_sync import (
    DEFAULT_PROBE_PROMPT,
    Retry,
    ServerUnreachable,
    WeightSyncError,
    sync_weights,
)

URL = "http://gpu:8000"
PROBE_ANSWER = {
    "choices": [
        {
            "index": 0,
            "text": " a b",
            "token_ids": [64, 293],
            "prompt_token_ids": DEFAULT_PROBE_PROMPT,
            "logprobs": {
                "token_logprobs": [-0.5, -0.25],
                "tokens": [" a", " b"],
                "text_offset": [0, 2],
                "top_logprobs": None,
            },
            "finish_reason": "length",
            "stop_reason": None,
        }
    ]
}


class Routes:
    """Scripted answers per (path, call number); records every call."""

    def __init__(self, **answers):
        self.answers = answers
        self.calls: list[tuple[str, dict | None]] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content) if req.content else None
        self.calls.append((req.url.path, body))
        if req.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "policy"}]})
        if req.url.path == "/v1/completions":
            return httpx.Response(200, json=PROBE_ANSWER)
        script = self.answers[req.url.path.strip("/")]
        seen = sum(1 for path, _ in self.calls if path == req.url.path)
        status, payload = script[min(seen, len(script)) - 1]
        return httpx.Response(status, json=payload)

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]


def test_vllm_reload_then_probe_verification(tmp_path):
    routes = Routes(collective_rpc=[(200, {"results": [None]})], reset_prefix_cache=[(200, {})])
    seen = []

    def probe(prompt, tokens):
        seen.append((prompt, tokens))
        return [-0.5 + 1e-3, -0.25]

    report = sync_weights(
        [URL], tmp_path, backend="vllm", probe=probe, transport=httpx.MockTransport(routes)
    )
    assert routes.paths() == [
        "/collective_rpc",
        "/reset_prefix_cache",
        "/v1/models",
        "/v1/completions",
    ]
    assert routes.calls[0][1] == {
        "method": "reload_weights",
        "kwargs": {"weights_path": str(tmp_path.resolve())},
    }
    probe_body = routes.calls[3][1]
    assert (
        probe_body["temperature"] == 1.0
        and probe_body["top_k"] == -1
        and probe_body["top_p"] == 1.0
    )
    assert seen == [(DEFAULT_PROBE_PROMPT, [64, 293])]
    assert (
        report.method == "reload"
        and report.verified
        and report.max_logprob_diff == pytest.approx(1e-3)
    )

    def stale(prompt, tokens):
        return [-0.9, -0.25]

    with pytest.raises(WeightSyncError, match="does not serve the trainer's weights"):
        sync_weights(
            [URL],
            tmp_path,
            backend="vllm",
            probe=stale,
            transport=httpx.MockTransport(
                Routes(collective_rpc=[(200, {})], reset_prefix_cache=[(200, {})])
            ),
        )


def test_vllm_without_a_path_argument_gets_update_config_then_reload(tmp_path):
    routes = Routes(
        collective_rpc=[
            (500, {"detail": "unexpected keyword 'weights_path'"}),
            (200, {}),
            (200, {}),
        ],
        reset_prefix_cache=[(200, {})],
    )
    with pytest.warns(UserWarning, match="not verified"):
        report = sync_weights(
            [URL], tmp_path, backend="vllm", transport=httpx.MockTransport(routes)
        )
    assert [body["method"] for path, body in routes.calls if path == "/collective_rpc"] == [
        "reload_weights",
        "update_config",
        "reload_weights",
    ]
    assert routes.calls[1][1]["args"] == [{"model_config": {"model": str(tmp_path.resolve())}}]
    assert report.method == "reload" and not report.verified


def test_vllm_without_dev_mode_cannot_reload_an_attached_server(tmp_path):
    routes = Routes(collective_rpc=[(404, {"detail": "Not Found"})])
    with pytest.raises(WeightSyncError, match="VLLM_SERVER_DEV_MODE=1"):
        sync_weights([URL], tmp_path, backend="vllm", transport=httpx.MockTransport(routes))


def test_sglang_update_weights_from_disk(tmp_path):
    routes = Routes(
        update_weights_from_disk=[
            (
                200,
                {
                    "success": True,
                    "message": "Succeeded to update model weights.",
                    "num_paused_requests": 0,
                },
            )
        ]
    )
    with pytest.warns(UserWarning, match="not verified"):
        report = sync_weights(
            ["http://a:30000", "http://b:30000"],
            tmp_path,
            backend="sglang",
            api_key="k",
            transport=httpx.MockTransport(routes),
        )
    assert (
        routes.calls == [("/update_weights_from_disk", {"model_path": str(tmp_path.resolve())})] * 2
    )
    assert report.method == "disk" and report.seconds >= 0
    failing = Routes(
        update_weights_from_disk=[
            (400, {"success": False, "message": "Failed to get weights iterator: shape mismatch"})
        ]
    )
    with pytest.raises(WeightSyncError, match="shape mismatch"):
        sync_weights(
            ["http://a:30000"], tmp_path, backend="sglang", transport=httpx.MockTransport(failing)
        )


class DownFor:
    """A server that refuses the first ``n`` connections, then answers like SGLang."""

    def __init__(self, n: int) -> None:
        self.n, self.attempts = n, 0

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.attempts += 1
        if self.attempts <= self.n:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=req)
        return httpx.Response(200, json={"success": True, "message": "ok"})


def test_a_sync_the_server_does_not_answer_is_retried_within_the_budget(tmp_path):
    down = DownFor(2)
    with pytest.warns(UserWarning, match="not verified"):
        sync_weights([URL], tmp_path, backend="sglang", retry=Retry(2, 0.01), transport=httpx.MockTransport(down))
    assert down.attempts == 3
    down = DownFor(3)
    with pytest.raises(ServerUnreachable) as err:
        sync_weights([URL], tmp_path, backend="sglang", retry=Retry(2, 0.01), transport=httpx.MockTransport(down))
    assert down.attempts == 3
    assert str(err.value).startswith(f"{URL}/update_weights_from_disk got no answer after 3 attempts: ConnectError")
    # An answer, even a refusal, is not retried: the server is there and said no.
    refusing = Routes(update_weights_from_disk=[(400, {"success": False, "message": "bad folder"})])
    with pytest.raises(WeightSyncError, match="bad folder") as err:
        sync_weights([URL], tmp_path, backend="sglang", retry=Retry(2, 0.01), transport=httpx.MockTransport(refusing))
    assert not isinstance(err.value, ServerUnreachable) and len(refusing.calls) == 1


def test_methods_are_checked_against_the_backend(tmp_path):
    with pytest.raises(WeightSyncError, match="no update_weights_from_disk"):
        sync_weights([URL], tmp_path, backend="vllm", method="disk")
    with pytest.raises(WeightSyncError, match="vLLM's dev-mode route"):
        sync_weights([URL], tmp_path, backend="builtin", method="reload")
    with pytest.raises(WeightSyncError, match="ManagedServer"):
        sync_weights([URL], tmp_path, backend="builtin", method="restart")
    with pytest.raises(WeightSyncError, match="no checkpoint folder"):
        sync_weights([URL], tmp_path / "missing", backend="builtin")
    with pytest.raises(ServerUnreachable, match="got no answer after 1 attempt: ConnectError"):
        sync_weights(["http://127.0.0.1:9"], tmp_path, backend="sglang", timeout=2)
