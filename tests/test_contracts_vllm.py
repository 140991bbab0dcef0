"""What the client, the launcher and the weight sync assume about vLLM, checked against the
installed vLLM's own code (request/response models, ``vllm serve``'s argument parser, the
dev-mode and weight-version route handlers). Runs on a CPU with the ``vllm`` extra installed.

``vllm.v1.worker.gpu_model_runner`` needs CUDA to import (``nvidia_cutlass_dsl`` reads
``cuda.bindings.runtime.cudaLibrary_t``): the one signature needed from it is read from its
installed source instead.
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from contracts import PROMPT, method_parameters, request, require, undeclared_keys

require("vllm")

import httpx  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from test_inference_client import VLLM_ANSWER  # noqa: E402
from test_inference_weight_sync import (  # noqa: E402
    PROBE_TOKENS,
    URL,
    VLLM_MODELS_ANSWER,
    trainer_logprobs,
    vllm_probe_answer,
)
from vllm import envs  # noqa: E402
from vllm.entrypoints.cli.serve import ServeSubcommand  # noqa: E402
from vllm.entrypoints.common.cli_args import validate_parsed_serve_args  # noqa: E402
from vllm.entrypoints.openai.completion.protocol import (  # noqa: E402
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
)
from vllm.entrypoints.rl.online.api_router import router as rl_router  # noqa: E402
from vllm.entrypoints.serve.dev.cache.api_router import router as cache_router  # noqa: E402
from vllm.entrypoints.serve.dev.rpc.api_router import router as rpc_router  # noqa: E402
from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList, UsageInfo  # noqa: E402
from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX  # noqa: E402
from vllm.outputs import WeightVersionSpan  # noqa: E402
from vllm.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402
from vllm.v1.engine import FINISH_REASON_STRINGS  # noqa: E402

from grpo_lightning.inference.client import (  # noqa: E402
    GenerationRequest,
    RolloutClient,
    openai_payload,
    parse_openai,
)
from grpo_lightning.inference.client import SamplingParams as OurSampling  # noqa: E402
from grpo_lightning.inference.launch import (  # noqa: E402
    ServerConfig,
    exposed_dev_mode_hosts,
    server_argv,
    server_env,
)
from grpo_lightning.inference.weight_sync import (  # noqa: E402
    DEFAULT_PROBE_PROMPT,
    WeightSyncError,
    sync_weights,
)


def to_sampling(body: dict) -> SamplingParams:
    """What vLLM's completion route makes of a body (validation and engine parameters)."""
    req = CompletionRequest.model_validate(body)
    return req.to_sampling_params(max_tokens=req.max_tokens)


@pytest.mark.parametrize(
    "params",
    [{}, {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "stop_token_ids": [13], "min_tokens": 2}],
    ids=["defaults", "every-option"],
)
def test_completion_bodies_validate_as_vllm_completion_requests(params):
    body = openai_payload(request(**params), "policy")
    body["return_weight_versions"] = True  # what the weight-sync probe adds
    assert undeclared_keys(body, CompletionRequest) == set()  # nothing vLLM would ignore
    req = CompletionRequest.model_validate(body)
    assert req.prompt == PROMPT and req.return_token_ids is True and req.return_weight_versions is True
    sp = to_sampling(body)
    ours = request(**params).params
    assert (sp.n, sp.seed, sp.max_tokens) == (3, 11, 5)
    assert sp.temperature == pytest.approx(ours.temperature) and sp.top_p == pytest.approx(ours.top_p)
    # Ours keeps every token with top_k 0, sent as -1; vLLM's "disabled" is 0 or -1.
    assert sp.top_k == ours.top_k if ours.top_k > 0 else sp.top_k in (0, -1)
    assert sp.logprobs == 0  # the sampled token's logprob only
    assert sp.min_tokens == ours.min_tokens and sp.skip_special_tokens is True
    assert sp.output_kind == RequestOutputKind.FINAL_ONLY
    assert set(sp.stop_token_ids or []) == set(ours.stop_token_ids or [])


def test_recorded_answers_are_shapes_vllm_sends():
    # The weight-sync test's probe answer and model list: exactly what vLLM serializes.
    for versions in (None, ["step-3"]):
        answer = vllm_probe_answer(trainer_logprobs(1), versions)
        assert CompletionResponse.model_validate(answer).model_dump(mode="json") == answer
    assert ModelList.model_validate(VLLM_MODELS_ANSWER).model_dump(mode="json") == VLLM_MODELS_ANSWER
    # The client test's answer (recorded from an older vLLM): valid, and nothing in it unknown.
    CompletionResponse.model_validate(VLLM_ANSWER)
    assert undeclared_keys(VLLM_ANSWER, CompletionResponse) == set()
    # The finish reasons the client tells apart (stop/length; abort is retried).
    assert {"stop", "length", "abort"} <= set(FINISH_REASON_STRINGS)


def test_what_vllm_serializes_is_what_the_client_reads():
    req = request()
    choices = [
        CompletionResponseChoice(
            index=i,
            text=f" t{i}",
            logprobs=CompletionLogProbs(
                text_offset=[0, 3], token_logprobs=[-0.5 - i, -0.25], tokens=[" t", f"{i}"],
                top_logprobs=[{" t": -0.5 - i}, {f"{i}": -0.25}],
            ),
            finish_reason="length",
            token_ids=[100 + i, 7],
            prompt_token_ids=PROMPT,
            weight_versions=[WeightVersionSpan("step-2", 0, 1), WeightVersionSpan("step-3", 1, 2)],
        )
        for i in (2, 0, 1)
    ]
    wire = CompletionResponse(model="policy", choices=choices, usage=UsageInfo(prompt_tokens=4)).model_dump_json()
    out = parse_openai(json.loads(wire), req)
    assert [c.token_ids for c in out] == [[100, 7], [101, 7], [102, 7]]
    assert [c.logprobs for c in out] == [[-0.5, -0.25], [-1.5, -0.25], [-2.5, -0.25]]
    assert [c.weight_versions for c in out] == [["step-2", "step-3"]] * 3


@pytest.fixture
def cpu_platform(monkeypatch):
    """vLLM's parser builds config defaults that detect the device; with no GPU (and vLLM's CUDA
    wheel) detection fails, so the CPU platform is set the way ``vllm bench`` does it."""
    from vllm import platforms

    if platforms.current_platform.is_unspecified():
        from vllm.platforms.cpu import CpuPlatform

        monkeypatch.setattr(platforms, "current_platform", CpuPlatform())


def serve_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed the way ``vllm serve`` (``vllm.entrypoints.cli.main``) parses it."""
    assert argv[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"]
    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    args = parser.parse_args(argv[3:])
    validate_parsed_serve_args(args)
    return args


def test_launch_argv_parses_with_vllm_serve(cpu_platform):
    config = ServerConfig(
        backend="vllm",
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_model_len=4096,
        max_num_seqs=32,
        extra_args=["--enforce-eager"],
    )
    argv = server_argv(config, "/ckpt/step-3", 30001, served_model_name="policy", trust_remote_code=True)
    assert argv[0] == sys.executable
    args = serve_args(argv)
    assert args.model_tag == "/ckpt/step-3" and args.served_model_name == ["policy"]
    assert (args.host, args.port) == ("127.0.0.1", 30001)
    assert (args.dtype, args.gpu_memory_utilization, args.max_model_len, args.max_num_seqs) == ("bfloat16", 0.3, 4096, 32)
    assert args.logprobs_mode == "processed_logprobs" and args.trust_remote_code and args.enforce_eager
    # Defaults too: dtype "auto" and no max_model_len.
    args = serve_args(server_argv(ServerConfig(backend="vllm"), "m", 8000))
    assert args.dtype == "auto" and args.max_model_len is None and args.trust_remote_code is False


def test_environment_variables_are_vllms():
    env = server_env(ServerConfig(backend="vllm", api_key="k"))
    assert set(env) == {"VLLM_API_KEY", "VLLM_SERVER_DEV_MODE"}
    assert set(env) <= set(envs.environment_variables)


def test_dev_mode_routes_are_outside_the_api_key_check():
    # The premise of the exposure warning: vLLM guards only these prefixes.
    for path in ("/collective_rpc", "/reset_prefix_cache", "/update_weight_version"):
        assert not path.startswith(GUARDED_PREFIX)
    assert "/v1/completions".startswith(GUARDED_PREFIX)
    with pytest.warns(UserWarning, match="dev-mode routes"):
        from grpo_lightning.inference.launch import ManagedServer

        ManagedServer(ServerConfig(backend="vllm", urls=["http://10.0.0.5:8000"]))
    assert exposed_dev_mode_hosts(ServerConfig(backend="vllm", urls=["http://127.0.0.1:8000"])) == []


def test_reload_weights_takes_a_weights_path():
    # collective_rpc("reload_weights", kwargs=...) reaches Worker.reload_weights(*args, **kwargs),
    # which passes them to the model runner's reload_weights.
    for module in ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner"):
        assert "weights_path" in method_parameters(module, "GPUModelRunner", "reload_weights"), module
    assert method_parameters("vllm.v1.worker.gpu_worker", "Worker", "reload_weights") == ["self", "*args", "**kwargs"]


class Engine:
    """The engine client behind vLLM's route handlers: records calls, keeps the version label."""

    def __init__(self, reset_results):
        self.reset_results = list(reset_results)
        self.version = "default"
        self.rpc: list[tuple[str, tuple, dict]] = []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpc.append((method, args, kwargs))
        return [None]  # one worker; reload_weights returns None

    async def reset_prefix_cache(self, reset_running_requests=False, reset_external=False):
        return self.reset_results.pop(0)

    async def update_weight_version(self, new_version: str) -> None:
        self.version = new_version

    async def get_weight_version(self) -> str:
        return self.version


def vllm_app(engine: Engine) -> FastAPI:
    """vLLM's own dev-mode and weight-version routers on ``engine``, with completion and model
    routes that validate with vLLM's request model and answer with its response models."""
    app = FastAPI()
    for router in (rpc_router, cache_router, rl_router):
        app.include_router(router)
    app.state.engine_client = engine

    @app.get("/v1/models")
    async def models() -> dict:
        return ModelList(data=[ModelCard(id="policy", root="/ckpt")]).model_dump()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict:
        sp = req.to_sampling_params(max_tokens=req.max_tokens)
        n = len(PROBE_TOKENS)
        choice = CompletionResponseChoice(
            index=0,
            text=" a b",
            logprobs=CompletionLogProbs(token_logprobs=trainer_logprobs(1), tokens=[" a", " b"], text_offset=[0, 2]),
            finish_reason="length",
            token_ids=PROBE_TOKENS[: sp.max_tokens],
            prompt_token_ids=req.prompt,
            weight_versions=[WeightVersionSpan(engine.version, 0, n)] if req.return_weight_versions else None,
        )
        return CompletionResponse(model="policy", choices=[choice], usage=UsageInfo()).model_dump()

    return app


def through(app: FastAPI, bodies: list[dict] | None = None) -> httpx.MockTransport:
    """A transport (sync and async) that hands every request to ``app``; ``bodies`` collects
    the JSON bodies as sent."""
    client = TestClient(app)

    def handle(req: httpx.Request) -> httpx.Response:
        if bodies is not None and req.content:
            bodies.append(json.loads(req.content))
        r = client.request(req.method, req.url.path, content=req.content, headers=dict(req.headers))
        return httpx.Response(r.status_code, content=r.content, headers=r.headers)

    return httpx.MockTransport(handle)


def test_weight_sync_through_vllms_route_handlers(tmp_path):
    engine = Engine(reset_results=[False, True])
    transport = through(vllm_app(engine))
    report = sync_weights(
        [URL], tmp_path, backend="vllm", version="step-1", probe_tokens=2, transport=transport,
        probe=lambda prompt, tokens: trainer_logprobs(1),
    )
    assert engine.rpc == [("reload_weights", (), {"weights_path": str(tmp_path.resolve())})]
    assert engine.reset_results == []  # success=false once, retried, then true
    assert engine.version == "step-1"
    assert (report.verified, report.weight_version, report.max_logprob_diff) == (True, "step-1", 0.0)

    # Weights not labelled (another replica answers, or the label was lost): the version catches it.
    engine = Engine(reset_results=[True])

    async def ignore(new_version: str) -> None:
        return None

    engine.update_weight_version = ignore
    with pytest.raises(WeightSyncError, match="weight version 'default', not 'step-2'"):
        sync_weights([URL], tmp_path, backend="vllm", version="step-2", transport=through(vllm_app(engine)))

    engine = Engine(reset_results=[False, False])
    with pytest.raises(WeightSyncError, match="success=false twice"):
        sync_weights([URL], tmp_path, backend="vllm", transport=through(vllm_app(engine)))


def test_the_client_generates_through_vllms_request_model():
    engine = Engine(reset_results=[])
    engine.version = "step-7"
    sent: list[dict] = []
    client = RolloutClient([URL], backend="vllm", transport=through(vllm_app(engine), sent), return_weight_versions=True)
    req = GenerationRequest(DEFAULT_PROBE_PROMPT, n=1, seed=0, params=OurSampling(max_tokens=2, top_k=5, stop_token_ids=[13]))
    out = client.generate([req])
    # What the openai SDK put on the wire (its own arguments plus extra_body) is our body, and
    # vLLM's request model declares every key of it: nothing dropped, added or ignored.
    assert sent == [{**openai_payload(req, "policy"), "return_weight_versions": True}]
    assert undeclared_keys(sent[0], CompletionRequest) == set()
    sp = to_sampling(sent[0])
    assert (sp.top_k, sp.stop_token_ids, sp.logprobs) == (5, [13], 0)
    completion = out[0][0]
    assert completion.token_ids == PROBE_TOKENS and completion.weight_versions == ["step-7"]
    assert completion.logprobs == trainer_logprobs(1)
