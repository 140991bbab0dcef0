"""What the client, the launcher and the weight sync assume about SGLang, checked against the
installed SGLang's own code (``GenerateReqInput`` and its ``/generate`` schema check,
``SamplingParams``, ``UpdateWeightFromDiskReqInput``, ``prepare_server_args``, the weight-version
bookkeeping that fills ``meta_info``). Runs on a CPU with the ``sglang`` extra installed; every
module used here imports without CUDA.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
from contracts import PROMPT, request, require

require("sglang")

import httpx  # noqa: E402
import msgspec  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402
from sglang.srt.entrypoints.api_contract import generate_contract_error  # noqa: E402
from sglang.srt.managers.io_struct import (  # noqa: E402
    GenerateReqInput,
    UpdateWeightFromDiskReqInput,
)
from sglang.srt.sampling.sampling_params import TOP_K_ALL, SamplingParams  # noqa: E402
from sglang.srt.server_args import prepare_server_args  # noqa: E402
from sglang.srt.utils.weight_versions import (  # noqa: E402
    WeightVersionEvent,
    add_weight_versions_to_meta_info,
    compute_weight_version_spans,
)
from test_inference_client import SGLANG_ANSWER  # noqa: E402
from test_inference_weight_sync import FakeSGLang  # noqa: E402

from grpo_lightning.inference.client import (  # noqa: E402
    GenerationRequest,
    parse_sglang,
    sglang_payload,
)
from grpo_lightning.inference.client import SamplingParams as OurSampling  # noqa: E402
from grpo_lightning.inference.launch import ServerConfig, server_argv  # noqa: E402
from grpo_lightning.inference.weight_sync import DEFAULT_PROBE_PROMPT, sync_weights  # noqa: E402

VOCAB = 151936


@pytest.mark.parametrize(
    "params",
    [{}, {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "stop_token_ids": [13], "min_tokens": 2}],
    ids=["defaults", "every-option"],
)
def test_generate_bodies_pass_sglangs_schema_and_sampling_params(params):
    body = sglang_payload(request(**params))
    assert generate_contract_error(body) is None  # the check /generate runs on the raw body
    obj = GenerateReqInput(**body)
    obj.normalize_batch_and_arguments()
    assert obj.batch_size == 3 and not obj.is_single and obj.return_logprob == [True] * 3
    ours = request(**params).params
    for i, raw in enumerate(obj.sampling_params):
        sp = SamplingParams(**raw)  # a key SGLang does not know is a TypeError here
        sp.verify(VOCAB)
        assert sp.sampling_seed == 11 + i  # one seed per copy: n samples, not n identical ones
        assert (sp.max_new_tokens, sp.min_new_tokens) == (5, ours.min_tokens)
        assert sp.temperature == pytest.approx(ours.temperature) and sp.top_p == pytest.approx(ours.top_p)
        assert sp.top_k == (ours.top_k if ours.top_k > 0 else TOP_K_ALL)
        assert sp.stop_token_ids == (set(ours.stop_token_ids) if ours.stop_token_ids else None)
        assert sp.skip_special_tokens is True


def test_update_weights_body_matches_the_request_model():
    body = {"model_path": "/runs/r1/sync_weights", "weight_version": "step-3"}
    fields = {f.name for f in msgspec.structs.fields(UpdateWeightFromDiskReqInput)}
    assert set(body) <= fields  # the route ignores unknown keys, so check them by name
    obj = TypeAdapter(UpdateWeightFromDiskReqInput).validate_python(body)  # as FastAPI's Body()
    assert (obj.model_path, obj.weight_version, obj.flush_cache) == ("/runs/r1/sync_weights", "step-3", True)


def test_recorded_updates_carry_what_the_sync_sends(tmp_path):
    # The weight-sync test's SGLang fake sees exactly the bodies the model above accepts.
    server = FakeSGLang()
    sync_weights(["http://a:30000"], tmp_path, backend="sglang", version="v1", transport=httpx.MockTransport(server))
    update = server.calls[0][1]
    TypeAdapter(UpdateWeightFromDiskReqInput).validate_python(update)
    assert set(update) <= {f.name for f in msgspec.structs.fields(UpdateWeightFromDiskReqInput)}
    # The probe's /generate body as the openai SDK's post put it on the wire: ours, unchanged.
    probe = GenerationRequest(prompt_ids=DEFAULT_PROBE_PROMPT, n=1, seed=0, params=OurSampling(max_tokens=8))
    assert server.calls[1][1] == sglang_payload(probe)
    assert generate_contract_error(server.calls[1][1]) is None


def test_meta_info_weight_versions_as_sglang_writes_them_are_read():
    # A completion of 5 tokens, the weights changed from "step-2" to "step-3" after 2 tokens.
    spans = compute_weight_version_spans([WeightVersionEvent("step-2", 2)], "step-3", 5)
    item = dict(SGLANG_ANSWER[1])
    meta = dict(item["meta_info"])
    add_weight_versions_to_meta_info(meta, spans, num_output_tokens=2)
    item["meta_info"] = meta
    req = GenerationRequest(prompt_ids=PROMPT, n=1, seed=0, params=OurSampling(max_tokens=2))
    (completion,) = parse_sglang([item], req)
    assert meta["weight_version"] == "step-2" and completion.weight_versions == ["step-2"]
    add_weight_versions_to_meta_info(meta, spans, num_output_tokens=5)
    item["meta_info"] = meta
    meta["output_token_logprobs"] = [[-0.5, t, None] for t in [1, 2, 3, 4, 5]]
    item["output_ids"] = [1, 2, 3, 4, 5]
    req = GenerationRequest(prompt_ids=PROMPT, n=1, seed=0, params=OurSampling(max_tokens=5))
    (completion,) = parse_sglang([item], req)
    assert completion.weight_versions == ["step-2", "step-3"]


def test_launch_argv_parses_with_sglangs_server_args():
    config = ServerConfig(
        backend="sglang",
        dtype="bfloat16",
        gpu_memory_utilization=0.4,
        max_model_len=4096,
        max_num_seqs=16,
        api_key="s3cret",
        deterministic=True,
        extra_args=["--tp-size", "2"],
    )
    argv = server_argv(config, "/ckpt/step-3", 30002, served_model_name="policy", trust_remote_code=True)
    assert argv[0] == sys.executable and argv[1:3] == ["-m", "sglang.launch_server"]
    assert importlib.util.find_spec("sglang.launch_server") is not None
    args = prepare_server_args(argv[3:])
    assert (args.model_path, args.served_model_name, args.host, args.port) == ("/ckpt/step-3", "policy", "127.0.0.1", 30002)
    assert (args.dtype, args.mem_fraction_static, args.context_length, args.max_running_requests) == ("bfloat16", 0.4, 4096, 16)
    assert args.api_key == "s3cret" and args.enable_deterministic_inference and args.trust_remote_code
    assert args.tp_size == 2
    defaults = prepare_server_args(server_argv(ServerConfig(backend="sglang"), "m", 30000)[3:])
    assert defaults.dtype == "auto" and defaults.context_length is None
    assert defaults.weight_version == "default"  # the label a server has before any update
