"""LoRA training (model.lora): config errors, adapter-only training, the reference without a
copy, adapter sync to a real built-in server, the request bodies of vLLM and SGLang, export."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grpo_lightning.cli import main
from grpo_lightning.inference.client import (
    GenerationRequest,
    RolloutClient,
    SamplingParams,
    openai_payload,
)
from grpo_lightning.inference.launch import (
    ManagedServer,
    ServerConfig,
    lora_server_argv,
    lora_server_env,
)
from grpo_lightning.inference.weight_sync import WeightSyncError, adapter_request, sync_weights
from grpo_lightning.inference.weights import folder_checksum, load_checkpoint
from grpo_lightning.logprobs import sequence_token_logprobs, shared_prompt_token_logprobs
from grpo_lightning.lora import (
    QWEN2_LLAMA_PROJECTIONS,
    LoraArgs,
    adapter_name,
    export_merged,
    merge_adapter,
    read_adapter,
    served_checksum,
)
from grpo_lightning.lora import main as export_main
from grpo_lightning.models import load_policy
from grpo_lightning.module import GRPOModule

ROOT = Path(__file__).resolve().parents[1]


def lora_module(seed: int = 0, **lora) -> GRPOModule:
    """A LoRA policy on tiny-sat whose adapters are non-zero (as after training), so that the
    adapter changes the model's outputs."""
    m = GRPOModule(kl_coef=0.05, lora=LoraArgs(enabled=True, **lora))
    torch.manual_seed(seed)  # PEFT draws A at random
    m.configure_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "key"),
    [(["--model.lora.rank", "0"], "model.lora.rank=0"), (["--model.lora.alpha", "0"], "model.lora.alpha=0.0"),
     (["--data.server.sync", "disk"], "data.server.sync='disk'"),
     (["--trainer.strategy", "fsdp"], "model.lora.enabled=true cannot run with trainer.strategy=fsdp"),
     (["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy", "--trainer.devices", "2"],
      "trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy")],
)
def test_bad_lora_settings_stop_before_anything_runs_with_one_line(args, key, tmp_path, capsys) -> None:
    code = main(["fit", "--config", str(ROOT / "configs" / "sat_tiny_lora.yaml"),
                 "--trainer.logger.init_args.save_dir", str(tmp_path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and key in err[0], err
    assert not any(tmp_path.rglob("*.ckpt")) and not any(tmp_path.rglob("server.log"))  # nothing ran


def test_target_modules_must_match_layers_and_spare_the_output_layer() -> None:
    m = GRPOModule(lora=LoraArgs(enabled=True, target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ValueError, match=r"^model\.lora\.target_modules: 'qkv_proj' matches no layer of Qwen2ForCausalLM"):
        m.configure_model()
    m = GRPOModule(lora=LoraArgs(enabled=True, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"^model\.lora\.target_modules: 'lm_head' is the output layer"):
        m.configure_model()


# ---------------------------------------------------------------------- training


def test_only_fp32_adapters_train_and_the_reference_is_the_base_without_a_copy(tiny_model) -> None:
    base_params = sum(p.numel() for p in tiny_model.parameters())
    m = lora_module()
    cfg = tiny_model.config
    hidden, inter, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = hidden // heads
    # r * (in + out) per adapted projection, per layer.
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv * head_dim), "v_proj": (hidden, kv * head_dim),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    adapter_params = cfg.num_hidden_layers * sum(16 * (i + o) for i, o in shapes.values())
    trainable = [p for p in m.policy.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == adapter_params
    assert all(p.dtype == torch.float32 for p in trainable)
    # No reference model: the module holds the base weights once, plus the adapters.
    assert m.ref_model is None and m.has_reference
    assert sum(p.numel() for p in m.parameters()) == base_params + adapter_params
    # Memory: every fp32 tensor the module holds, each storage once (tied embeddings are one).
    held = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in m.parameters()}
    assert sum(held.values()) == 4 * (base_params + adapter_params)
    full = GRPOModule(kl_coef=0.05)
    full.configure_model()
    assert sum(p.numel() for p in full.ref_model.parameters()) == base_params  # what LoRA saves

    ids = torch.randint(3, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    base_lp, _ = sequence_token_logprobs(tiny_model, ids, mask)
    policy_lp, _ = sequence_token_logprobs(m.policy, ids, mask)
    with torch.no_grad(), m.reference() as ref:
        ref_lp, _ = sequence_token_logprobs(ref, ids, mask)
    assert torch.allclose(ref_lp, base_lp, atol=1e-5)
    assert (policy_lp - base_lp).abs().max() > 1e-2  # the adapters are on outside the context
    policy_lp.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in m.policy.parameters() if not p.requires_grad)


def test_share_prompts_and_gradient_checkpointing_work_with_lora() -> None:
    """The shared-prompt path gives the per-sequence path's values and adapter gradients; with
    gradient checkpointing (frozen embeddings) the adapters still get their gradients."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 200, (1, 9), generator=g)
    completions = torch.randint(3, 200, (2, 5), generator=g)
    seq = torch.cat([prompt.repeat(2, 1), completions], dim=1)
    grads = []
    for shared, checkpointing in ((False, False), (True, False), (False, True)):
        m = lora_module()
        if checkpointing:
            m = GRPOModule(lora=LoraArgs(enabled=True), gradient_checkpointing=True, share_prompts=False)
            m.configure_model()
            m.policy.load_state_dict(lora_module().policy.state_dict())
        if shared:
            lp, _ = shared_prompt_token_logprobs(m.policy, prompt, torch.ones_like(prompt), completions,
                                                 torch.ones_like(completions), torch.zeros(2, dtype=torch.long))
        else:
            lp, _ = sequence_token_logprobs(m.policy, seq, torch.ones_like(seq))
            lp = lp[:, prompt.shape[1] - 1:]
        lp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.policy.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and torch.allclose(grads[0], grads[2], atol=1e-5)
    assert grads[0].abs().sum() > 0


def test_a_lora_checkpoint_holds_only_the_adapter_and_restores_it(tmp_path) -> None:
    m = lora_module()
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    other = lora_module(seed=5)
    other.on_load_checkpoint(ckpt)
    other.load_state_dict(ckpt["state_dict"], strict=other.strict_loading)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="no weights for .* adapter tensors"):
        other.on_load_checkpoint({"state_dict": {}})


# ---------------------------------------------------------------------- the built-in server


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("adapters")
    a = lora_module(seed=0).save_hf(out / "all")
    q = lora_module(seed=1, target_modules=["q_proj"]).save_hf(out / "q_only")
    return {"all": a, "q_only": q}


def test_adapter_folder_is_standard_peft(adapters) -> None:
    files = {p.name for p in adapters["all"].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    config = json.loads((adapters["all"] / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and sorted(config["target_modules"]) == sorted(QWEN2_LLAMA_PROJECTIONS)
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(adapters["all"] / "adapter_model.safetensors"))


def peft_merged_probe(base: Path, adapter: Path):
    """Log-probabilities (the weight-sync probe's) of ``base`` with ``adapter`` merged by PEFT's
    ``merge_and_unload``: what the served weights must give, computed apart from the server's merge."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_policy(str(base), dtype=torch.float32), str(adapter)).merge_and_unload().eval()

    def probe(prompt: list[int], completion: list[int]) -> list[float]:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logprobs, _ = sequence_token_logprobs(model, ids, torch.ones_like(ids))
        return logprobs[0, len(prompt) - 1 :].tolist()

    return probe


def test_builtin_server_serves_adapters_without_a_restart(adapters, tiny_sat_path, tmp_path) -> None:
    with ManagedServer(ServerConfig(backend="builtin", device="cpu"), model="tiny-sat", log_path=tmp_path / "s.log") as server:
        pid = server.pid
        base_checksum = folder_checksum(tiny_sat_path)
        # A seeded sample of the base weights, to tell them apart (to the bit) from what an adapter serves.
        request = GenerationRequest(prompt_ids=[5, 6, 7], n=1, seed=0, params=SamplingParams(max_tokens=6))
        base_sample = server.client(adapter=None).generate([request])[0][0]
        checksums = []
        for which in ("all", "q_only", "all"):  # q_only after all: the other weights go back to the base
            report = sync_weights(server, adapters[which], probe=peft_merged_probe(tiny_sat_path, adapters[which]))
            assert report.method == "adapter" and report.verified and server.pid == pid
            # The checksum the trainer computes from the adapter it saved...
            assert report.checksum == served_checksum(tiny_sat_path, adapters[which], "float32")
            assert report.adapter == adapter_name(adapters[which]) == server.adapter[0]
            # ...and the merged weights serve: PEFT's merge of the base and the adapter, to float rounding.
            assert report.max_logprob_diff < 1e-4
            checksums.append(report.checksum)
        # One checksum per adapter: the same adapter again gives the same one, another adapter
        # or none a different one.
        assert checksums[0] == checksums[2] and len({checksums[0], checksums[1], base_checksum}) == 3
        adapted = server.client().generate([request])[0][0]
        assert adapted.logprobs != base_sample.logprobs
        # Unloading serves the base again, bit for bit (the kept copy of the adapted weights):
        # the base's checksum, and the base's seeded sample, tokens and logprobs equal.
        http = httpx.Client(base_url=server.urls[0])
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": report.adapter}).json()["checksum"] == base_checksum
        assert http.get("/get_model_info").json()["lora_adapter"] is None
        again = server.client(adapter=None).generate([request])[0][0]
        assert (again.token_ids, again.logprobs) == (base_sample.token_ids, base_sample.logprobs)
        base_probe = GRPOModule()
        base_probe.configure_model()
        assert sync_weights(server.urls, tiny_sat_path, backend="builtin", probe=base_probe.probe_logprobs).max_logprob_diff < 1e-4
        report = sync_weights(server, adapters["all"], probe=lora_module(seed=0).probe_logprobs)
        assert report.max_logprob_diff < 1e-4
        # Requests name the adapter; the base model's name is no longer served.
        assert server.client().generate([request])[0][0].token_ids
        with pytest.raises(Exception, match="does not exist"):
            server.client(adapter=None).generate([request])
        # A server that rejects an adapter says why; an attached server's run stops on it.
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "adapter_config.json").write_text((adapters["all"] / "adapter_config.json").read_text())
        tensors = load_file(adapters["all"] / "adapter_model.safetensors")
        from safetensors.torch import save_file

        save_file({k: v[:, :3].contiguous() if "lora_A" in k else v for k, v in tensors.items()}, bad / "adapter_model.safetensors")
        with pytest.raises(WeightSyncError, match=r"refused the LoRA adapter .*HTTP 400 .*does not fit"):
            sync_weights(server.urls, bad, backend="builtin")
        # ...and a managed server that rejects one is restarted on the base and given it again,
        # which fails the same way: the run stops rather than train against stale weights.
        with pytest.warns(UserWarning, match="restarting the server instead"), pytest.raises(Exception, match="did not take the adapter"):
            sync_weights(server, bad)


# ---------------------------------------------------------------------- vLLM / SGLang contracts


def _recorded(status: int = 200, body: object = "Success", labels: bool = True) -> tuple[list, httpx.MockTransport]:
    """A vLLM / SGLang stand-in that records requests, answers adapter routes with ``status`` and
    ``body``, and reports the weight version last set with each completion (as both do);
    ``labels=False``: one that accepts a new version but keeps reporting the old one."""
    calls: list[tuple[str, dict]] = []
    version = ["initial"]

    def handler(req: httpx.Request) -> httpx.Response:
        payload = json.loads(req.content) if req.content else {}
        calls.append((req.url.path, payload))
        if req.url.path == "/update_weight_version":
            version[0] = payload["new_version"] if labels else version[0]
            return httpx.Response(200, json={"success": True})
        if req.url.path == "/v1/completions":
            versions = [{"version": version[0], "num_tokens": 1}] if payload.get("return_weight_versions") else None
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "token_ids": [9], "weight_versions": versions,
                                                          "logprobs": {"token_logprobs": [-0.5]}, "finish_reason": "length"}]})
        if req.url.path == "/generate":
            return httpx.Response(200, json=[{"text": "x", "output_ids": [9], "meta_info": {
                "output_token_logprobs": [[-0.5, 9, "x"]], "finish_reason": {"type": "length"}, "weight_version": version[0]}}])
        return httpx.Response(status, json=body)

    return calls, httpx.MockTransport(handler)


def test_vllm_and_sglang_adapter_bodies_follow_their_request_models(adapters) -> None:
    # vllm/entrypoints/serve/lora/protocol.py: LoadLoRAAdapterRequest(lora_name: str, lora_path: str);
    # sglang/srt/managers/io_struct.py: LoadLoRAAdapterReqInput(lora_name, lora_path, pinned=False, lora_id=None).
    body = adapter_request("lora-x", "/ckpt")
    try:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
    except ImportError:
        assert set(body) == {"lora_name", "lora_path"}
    else:
        assert LoadLoRAAdapterRequest.model_validate(body).lora_path == "/ckpt"
    try:
        from sglang.srt.managers.io_struct import LoadLoRAAdapterReqInput
    except ImportError:
        assert set(body) <= {"lora_name", "lora_path", "pinned", "lora_id"}
    else:
        assert LoadLoRAAdapterReqInput(**body).lora_name == "lora-x"
    # The version label after an adapter load: vLLM's body (tests/test_contracts_vllm.py), and
    # sglang/srt/managers/io_struct.py: UpdateWeightVersionReqInput(new_version, abort_all_requests).
    try:
        from sglang.srt.managers.io_struct import UpdateWeightVersionReqInput
    except ImportError:  # the body sent is pinned field for field below
        UpdateWeightVersionReqInput = None

    folder = str(adapters["all"].resolve())
    name = adapter_name(folder)
    for backend, route in (("vllm", "/v1/load_lora_adapter"), ("sglang", "/load_lora_adapter")):
        calls, transport = _recorded(body="Success: LoRA adapter added." if backend == "vllm" else {"success": True})
        report = sync_weights(["http://gpu:8000"], folder, backend=backend, transport=transport,
                              probe=lambda prompt, tokens: [-0.5], version="step-7")
        assert calls[0] == (route, {"lora_name": name, "lora_path": folder})
        # The new adapter is labelled with the sync's weight version, as a full sync is...
        assert calls[1] == ("/update_weight_version", {"new_version": "step-7"})
        if UpdateWeightVersionReqInput is not None:
            assert UpdateWeightVersionReqInput(**calls[1][1]).new_version == "step-7"
        generation = calls[2][1]
        # ...and the probe's request names the adapter: vLLM as the model, SGLang as lora_path.
        assert generation.get("model") == name if backend == "vllm" else generation["lora_path"] == name
        assert report.method == "adapter" and report.verified and report.adapter == name
        assert report.weight_version == "step-7"
        # Without a probe the version alone verifies the sync; a server that kept an older label fails it.
        assert sync_weights(["http://gpu:8000"], folder, backend=backend, transport=transport, version="step-8").verified
    _, stale = _recorded(labels=False)
    with pytest.raises(WeightSyncError, match="sampled by weight version 'initial', not 'step-9'"):
        sync_weights(["http://gpu:8000"], folder, backend="vllm", transport=stale, version="step-9")
    # vLLM answers 400 for a name it has loaded already: with names derived from the weights,
    # that is the same adapter. Any other refusal stops the sync with the server's reason.
    calls, transport = _recorded(400, {"error": {"message": "The lora adapter 'x' has already been loaded.", "code": 400}})
    assert sync_weights(["http://gpu:8000"], folder, backend="vllm", transport=transport,
                        probe=lambda p, t: [-0.5]).verified
    calls, transport = _recorded(400, {"success": False, "error_message": "LoRA rank 16 exceeds max_lora_rank 8"})
    with pytest.raises(WeightSyncError, match="exceeds max_lora_rank 8"):
        sync_weights(["http://gpu:8000"], folder, backend="sglang", transport=transport)


def test_managed_servers_are_launched_to_take_adapters_and_drop_the_old_one(adapters, tmp_path) -> None:
    # vllm/config/lora.py: max_lora_rank is one of 1, 8, 16, 32, 64, ...: 12 is rounded up.
    assert lora_server_argv("vllm", 12, ["q_proj"]) == ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "2"]
    assert lora_server_argv("sglang", 12, ["q_proj", "v_proj"]) == [
        "--enable-lora", "--max-lora-rank", "12", "--lora-target-modules", "q_proj", "v_proj", "--max-loras-per-batch", "2"]
    assert lora_server_argv("builtin", 12, ["q_proj"]) == [] and lora_server_env("vllm") == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with pytest.raises(ValueError, match="model.lora.rank=1024"):
        lora_server_argv("vllm", 1024, ["q_proj"])
    server = ManagedServer(ServerConfig(backend="vllm", urls=["http://gpu:8000"]))
    calls, transport = _recorded()
    for which in ("all", "q_only"):
        sync_weights(server, adapters[which], transport=transport, probe=lambda p, t: [-0.5])
    paths = [p for p, _ in calls]
    assert paths == ["/v1/load_lora_adapter", "/update_weight_version", "/v1/completions", "/v1/load_lora_adapter",
                     "/v1/unload_lora_adapter", "/update_weight_version", "/v1/completions"]
    assert calls[4][1] == {"lora_name": adapter_name(adapters["all"])}
    assert server.client().adapter == adapter_name(adapters["q_only"])
    payload = openai_payload(GenerationRequest([1], 1, 0, SamplingParams(max_tokens=1)), "m")
    assert payload["model"] == "m" and RolloutClient(["http://x"], adapter="a").adapter == "a"


# ---------------------------------------------------------------------- export


def test_export_merges_into_an_ordinary_hf_folder_with_the_adapters_logits(adapters, tiny_sat_path, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    assert export_main(["--adapter", str(adapters["all"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = lora_module(seed=0).policy.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    # The same weights the built-in server serves for this adapter, bit for bit.
    served = merge_adapter(load_checkpoint(tiny_sat_path), *read_adapter(adapters["all"]), torch.float32)
    exported = load_checkpoint(out)
    assert served and all(torch.equal(exported[k], t) for k, t in served.items())
    assert export_main(["--adapter", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err
    assert export_merged(adapters["q_only"], tmp_path / "m2", base=tiny_sat_path).is_dir()



@pytest.mark.slow
def test_a_lora_run_resumes_exactly_from_last_ckpt(tmp_path) -> None:
    """Two LoRA iterations with a KL term, uninterrupted, against one iteration then
    ``--ckpt_path last``: the second iteration's metrics and the final adapters are the same."""
    from helpers import assert_same_iteration, load
    from test_training import TINY

    config = str(ROOT / "configs" / "sat_tiny_lora.yaml")
    extra = [*TINY, "--model.kl_coef", "0.05", "--model.num_iterations", "1", "--data.eval.num_problems", "0",
             "--checkpoint.save_interval", "1"]

    def fit(name: str, *more: str) -> Path:
        assert main(["fit", "--config", config, "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--trainer.logger.init_args.name", name, *extra, *more]) == 0
        return tmp_path / name / "version_0"

    straight = fit("straight", "--trainer.max_epochs", "2")
    fit("resumed", "--trainer.max_epochs", "1")
    resumed = fit("resumed", "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert load(resumed / "metrics" / "train_iter_001.json")["train/kl/mean"] > 0
    for i in range(2):
        name = f"train_iter_{i:03d}.json"
        assert_same_iteration(load(straight / "metrics" / name), load(resumed / "metrics" / name), name)
    a = load_file(straight / "checkpoints" / "iter_001" / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoints" / "iter_001" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # last.ckpt holds the adapters (and their optimizer state), not the frozen base.
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert len(state) == len(a) and all("lora_" in k for k in state)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two runs, one of them two processes plus a server
def test_lora_under_ddp_trains_the_adapters_of_one_process(tmp_path) -> None:
    """One LoRA iteration (a KL term against the adapters-off reference, two passes of two
    steps) on two DDP ranks against the same iteration in one process: both ranks end with the
    same adapters, equal to the single process's (DDP averages the adapters' gradients; the
    frozen base takes no part)."""
    import os
    import subprocess
    import sys

    from helpers import load
    from test_training import TINY

    config = str(ROOT / "configs" / "sat_tiny_lora.yaml")
    common = ["--config", config, *TINY, "--trainer.max_epochs", "1", "--data.eval.num_problems", "0",
              "--model.kl_coef", "0.05", "--model.num_iterations", "2", "--model.steps_per_iteration", "2",
              "--trainer.logger.init_args.save_dir", str(tmp_path)]
    assert main(["fit", *common, "--trainer.logger.init_args.name", "single"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "grpo_lightning", "fit", *common, "--trainer.logger.init_args.name", "ddp",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.callbacks+=ddp_probe.WeightDigest"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = tmp_path / "single" / "version_0", tmp_path / "ddp" / "version_0"
    assert (ddp / "digest_rank0.txt").read_text() == (ddp / "digest_rank1.txt").read_text()
    m, ref = load(ddp / "metrics" / "train_iter_000.json"), load(single / "metrics" / "train_iter_000.json")
    assert m["problem_seeds"] == ref["problem_seeds"] and m["train/tokens"] == ref["train/tokens"]
    assert m["train/optimizer_steps"] == ref["train/optimizer_steps"] >= 1
    assert m["train/kl/mean"] > 0 and m["sync/method"] == "adapter" and m["sync/verified"]
    a = load_file(ddp / "checkpoints" / "iter_000" / "adapter_model.safetensors")
    b = load_file(single / "checkpoints" / "iter_000" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-4  # it trained (B starts at 0)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
