"""ManagedServer: launch commands, health, logs, restarts, no orphans, attach mode."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from helpers import pid_alive, wait_until
from jsonargparse import ArgumentParser
from safetensors.torch import load_file, save_file
from test_inference_client import FakeServer

from grpo_lightning.inference.client import GenerationRequest, SamplingParams, ServerUnavailable
from grpo_lightning.inference.launch import ManagedServer, ServerConfig, server_argv, server_env
from grpo_lightning.inference.weight_sync import WeightSyncError, sync_weights
from grpo_lightning.inference.weights import folder_checksum
from grpo_lightning.models import load_tokenizer


def wait_gone(pid: int, seconds: float = 20.0) -> bool:
    return wait_until(lambda: not pid_alive(pid), seconds)


def test_server_config_parses_with_jsonargparse_and_documents_every_field():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ServerConfig, "server")
    cfg = parser.parse_args(
        [
            "--server.backend=vllm",
            "--server.port=8001",
            "--server.gpu=1",
            '--server.extra_args=["--enforce-eager"]',
        ]
    )
    server = parser.instantiate_classes(cfg).server
    assert server == ServerConfig(backend="vllm", port=8001, gpu=1, extra_args=["--enforce-eager"])
    text = parser.format_help()
    for name in ServerConfig.__dataclass_fields__:
        assert f"--server.{name} " in text
    assert "Seconds to wait for a launched server" in text
    with pytest.raises(Exception, match="backend"):
        parser.parse_args(["--server.backend=tgi"])


def test_launch_commands_and_environment():
    vllm = ServerConfig(
        backend="vllm",
        gpu=1,
        api_key="s3cret",
        max_model_len=4096,
        gpu_memory_utilization=0.3,
        max_num_seqs=32,
    )
    argv = server_argv(vllm, "/ckpt/step-3", 30001, served_model_name="policy")
    # ``vllm serve MODEL``; tests/test_contracts_vllm.py parses it with vLLM's own parser.
    assert argv[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "/ckpt/step-3"]
    pairs = dict(zip(argv[5::2], argv[6::2], strict=False))
    assert (
        pairs["--served-model-name"] == "policy"
        and pairs["--port"] == "30001"
        and pairs["--host"] == "127.0.0.1"
    )
    assert (
        pairs["--gpu-memory-utilization"] == "0.3"
        and pairs["--max-model-len"] == "4096"
        and pairs["--max-num-seqs"] == "32"
    )
    assert pairs["--logprobs-mode"] == "processed_logprobs"
    assert "s3cret" not in argv
    env = server_env(vllm)
    assert env == {
        "CUDA_VISIBLE_DEVICES": "1",
        "VLLM_API_KEY": "s3cret",
        "VLLM_SERVER_DEV_MODE": "1",
    }
    assert "VLLM_SERVER_DEV_MODE" not in server_env(ServerConfig(backend="vllm", sync="restart"))

    sglang = ServerConfig(
        backend="sglang", max_model_len=4096, deterministic=True, extra_args=["--tp", "2"]
    )
    argv = server_argv(sglang, "/ckpt", 30002)
    assert argv[:5] == [sys.executable, "-m", "sglang.launch_server", "--model-path", "/ckpt"]
    assert argv[-3:] == ["--enable-deterministic-inference", "--tp", "2"]
    assert {"--mem-fraction-static", "--context-length", "--max-running-requests"} <= set(argv)

    builtin = ServerConfig(api_key="k", device="cpu")
    argv = server_argv(builtin, "tiny-sat", 8000)
    assert argv[1:3] == ["-m", "grpo_lightning.inference.server"] and "k" not in argv
    assert argv[argv.index("--parent-pid") + 1] == str(os.getpid())
    assert server_env(builtin) == {"GRPO_LIGHTNING_API_KEY": "k"}
    assert "--trust-remote-code" not in argv  # off unless the trainer's model needs it
    for backend in ("builtin", "vllm", "sglang"):
        argv = server_argv(ServerConfig(backend=backend), "m", 1, trust_remote_code=True)
        assert "--trust-remote-code" in argv, backend


def test_dead_server_fails_fast_with_a_one_line_cause(tmp_path):
    server = ManagedServer(
        ServerConfig(startup_timeout=60),
        model="/nonexistent/model",
        log_path=tmp_path / "server.log",
    )
    with pytest.raises(ServerUnavailable) as err:  # at the exit, not at the 60 s deadline
        server.start()
    message = str(err.value)
    assert "\n" not in message
    assert (
        server.urls[0] in message
        and "exited with code 1" in message
        and "no such folder" in message
    )
    assert server.pid is None


def test_startup_deadline_stops_the_half_started_server(tmp_path):
    server = ManagedServer(
        ServerConfig(startup_timeout=1.0), model="tiny-sat", log_path=tmp_path / "server.log"
    )
    launched: list[int] = []
    launch = server._launch

    def spy() -> None:
        launch()
        launched.append(server.pid)

    server._launch = spy
    with pytest.raises(ServerUnavailable, match=r"not healthy after 1s"):
        server.start()
    assert wait_gone(launched[0], 5)


CHILD = """
import sys, threading, time
from grpo_lightning.inference.launch import ManagedServer, ServerConfig

server = ManagedServer(ServerConfig(startup_timeout=300), model=sys.argv[1], log_path=sys.argv[2])

def report():
    while server.pid is None:
        time.sleep(0.01)
    print(server.pid, flush=True)

threading.Thread(target=report, daemon=True).start()
server.start()
time.sleep(600)
"""


def test_sigterm_to_the_trainer_leaves_no_server_behind(tmp_path, tiny_sat_path):
    trainer = subprocess.Popen(
        [sys.executable, "-c", CHILD, tiny_sat_path, str(tmp_path / "server.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server_pid = int(trainer.stdout.readline())
        assert pid_alive(server_pid)
        time.sleep(0.5)
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=30) == -signal.SIGTERM
        assert wait_gone(server_pid), "the server outlived a trainer stopped by SIGTERM"
    finally:
        trainer.kill()
        trainer.wait()


def test_attached_servers_are_used_but_never_stopped(tmp_path):
    answer = {
        "choices": [
            {
                "index": 0,
                "text": "x",
                "token_ids": [5],
                "logprobs": {"token_logprobs": [-1.0]},
                "finish_reason": "length",
            }
        ]
    }

    def script(path, hit):
        if path == "/v1/models":
            return 0.0, 200, {"data": [{"id": "remote"}]}
        return 0.0, 200, answer

    with FakeServer(script) as url:
        server = ManagedServer(ServerConfig(urls=[url + "/"]))
        with server:
            assert server.urls == [url] and not server.managed and server.pid is None
            completions = server.client().generate(
                [GenerationRequest([1, 2], 1, 0, SamplingParams(max_tokens=1))]
            )
            assert completions[0][0].token_ids == [5]
            with pytest.raises(RuntimeError, match="attached"):
                server.restart()
            with pytest.raises(WeightSyncError, match="restart"):
                sync_weights(server, tmp_path, method="restart")
        assert httpx.get(f"{url}/health").status_code == 200


def test_lifecycle_kill_mid_batch_restart_and_exception(tmp_path, tiny_sat_path, tiny_tokenizer):
    """Start, health, log; SIGKILL mid-batch and restart: retries succeed with the same tokens;
    an exception in the ``with`` block stops the server."""
    log = tmp_path / "run" / "server.log"
    checkpoint = tmp_path / "step-1"
    shutil.copytree(tiny_sat_path, checkpoint)
    config = ServerConfig(
        startup_timeout=180, max_retries=200, backoff=0.25, extra_args=["--num-threads", "1"]
    )
    prompt = tiny_tokenizer(
        "Variables: 7\nClauses:\n(x1 OR NOT x2 OR x3)\n", add_special_tokens=False
    )["input_ids"]
    requests = [
        GenerationRequest(
            prompt, n=2, seed=100 * i, params=SamplingParams(max_tokens=48, min_tokens=48)
        )
        for i in range(12)
    ]

    with (
        pytest.raises(RuntimeError, match="boom"),
        ManagedServer(config, model=tiny_sat_path, log_path=log) as server,
    ):
        first_pid = server.pid
        server.client().health()
        assert "serving" in log.read_text()
        expected = server.client().generate(requests)

        async def crash_and_recover():
            running = asyncio.create_task(server.client(max_backoff=1.0).agenerate(requests))
            async with httpx.AsyncClient(timeout=5) as http:
                while (await http.get(f"{server.urls[0]}/get_model_info")).json()["running"] == 0:
                    await asyncio.sleep(0.005)
            os.killpg(first_pid, signal.SIGKILL)
            report = await asyncio.to_thread(sync_weights, server, checkpoint, method="restart")
            return await running, report

        recovered, report = asyncio.run(crash_and_recover())
        assert [[c.token_ids for c in group] for group in recovered] == [
            [c.token_ids for c in group] for group in expected
        ]
        assert report.method == "restart" and report.verified and report.seconds > 0
        assert not pid_alive(first_pid) and server.pid != first_pid
        second_pid = server.pid
        raise RuntimeError("boom")
    assert wait_gone(second_pid, 5)
    assert server.pid is None
    assert log.read_text().count("starting:") == 2


def test_a_base_model_without_chat_template_serves_but_does_not_train(tiny_sat_path, tmp_path):
    """vLLM serves base models; so does the built-in server (it only decodes). The trainer
    renders prompts with the chat template, so it refuses such a tokenizer, by name."""
    base = tmp_path / "base"
    shutil.copytree(tiny_sat_path, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config_path = base / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(str(base))
    with ManagedServer(ServerConfig(device="cpu", startup_timeout=180), model=str(base), log_path=tmp_path / "log") as server:
        r = httpx.post(f"{server.urls[0]}/v1/completions", timeout=60,
                       json={"prompt": "Variables: 3", "max_tokens": 4, "seed": 0, "temperature": 1.0})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["finish_reason"] in ("stop", "length") and r.json()["usage"]["prompt_tokens"] > 0


def test_a_launched_server_found_dead_at_the_sync_is_started_on_the_new_weights(tiny_sat_path, tmp_path):
    """Whatever the sync method, weights cannot be pushed into a process that is gone: a server
    of ours that died between two syncs is started on the new checkpoint (and verified)."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_sat_path, checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    weights["model.norm.weight"] += 0.5  # new weights, so that serving the old ones cannot pass
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    config = ServerConfig(device="cpu", startup_timeout=180, sync="disk", max_retries=1, backoff=0.1)
    with ManagedServer(config, model=tiny_sat_path, log_path=tmp_path / "server.log") as server:
        first = server.pid
        os.killpg(first, signal.SIGKILL)
        assert wait_until(lambda: server.exit_code is not None, 30)
        assert server.exit_code == -signal.SIGKILL
        with pytest.warns(UserWarning, match=r"server process exited \(code -9\); restarting it on"):
            report = sync_weights(server, checkpoint)
        assert report.method == "restart" and report.verified and server.pid != first
        assert report.checksum == folder_checksum(checkpoint) != folder_checksum(tiny_sat_path)
        assert server.recoveries == 1  # the trainer's server/restarts
        assert server.served_weights == str(checkpoint.resolve()) and server.exit_code is None


def test_a_server_launched_through_another_interpreter(tmp_path, tiny_sat_path):
    # A wrapper in front of the interpreter, as for a container or a separate environment:
    # it records how it was called, then runs the interpreter it wraps.
    wrapper = tmp_path / "bin" / "server-python"
    wrapper.parent.mkdir()
    calls = tmp_path / "calls.txt"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    config = ServerConfig(device="cpu", python=str(wrapper), startup_timeout=180)
    with ManagedServer(config, model=tiny_sat_path, log_path=tmp_path / "server.log") as server:
        assert httpx.get(f"{server.urls[0]}/health").status_code == 200
        out = server.client().generate([GenerationRequest([1, 2], 1, 0, SamplingParams(max_tokens=2))])
        assert len(out[0][0].token_ids) >= 1
        (line,) = calls.read_text().splitlines()
        assert line.startswith(f"-m grpo_lightning.inference.server --model {tiny_sat_path} ")
        assert f"--port {server.port}" in line
    with pytest.raises(ValueError, match=r"^data.server.python='/nonexistent/python' is not an executable"):
        ManagedServer(ServerConfig(python="/nonexistent/python"), model=tiny_sat_path)


PREFORKED = """
import json, os, sys
from pathlib import Path

import grpo_lightning.inference.server  # what a sweep's fork server has imported
from grpo_lightning.inference import prefork
from grpo_lightning.inference.client import GenerationRequest, SamplingParams
from grpo_lightning.inference.launch import ManagedServer, ServerConfig

model, out = sys.argv[1], Path(sys.argv[2])
prefork.start()
result = {"ready": prefork._ready[0]}
reqs = [GenerationRequest([5, 6, 7], 4, 11, SamplingParams(max_tokens=6, temperature=1.0))]
for name in ("first", "second"):
    with ManagedServer(ServerConfig(device="cpu", startup_timeout=180), model=model, log_path=out / name) as server:
        pid = server.pid
        result[name] = {
            "pid": pid,
            "cmdline": Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\\0"),
            "sid": os.getsid(pid),
            "completions": [[c.token_ids, c.logprobs] for c in server.client().generate(reqs)[0]],
        }
    result[name]["gone"] = not Path(f"/proc/{pid}").exists()
prefork.start()
unused = prefork._ready[0]
prefork.discard()
result["unused_gone"] = not Path(f"/proc/{unused}").exists()
print(json.dumps(result))
"""


def test_a_preforked_process_becomes_the_first_built_in_server(tmp_path, tiny_sat_path):
    """A sweep trial's first server is the process it forked with the imports done: its own
    session, its log, the same answers as a server started by ``Popen`` (the second launch), and
    stopped like one. A pre-forked process never used ends with its parent's call."""
    proc = subprocess.run([sys.executable, "-c", PREFORKED, tiny_sat_path, str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    first, second = r["first"], r["second"]
    assert first["pid"] == r["ready"] and first["sid"] == first["pid"] and second["sid"] == second["pid"]
    assert "grpo_lightning.inference.server" not in first["cmdline"]  # no exec: the parent's command line
    assert second["cmdline"][1:3] == ["-m", "grpo_lightning.inference.server"]
    assert first["completions"] == second["completions"] and len(first["completions"]) == 4
    assert first["gone"] and second["gone"] and r["unused_gone"]
    log = (tmp_path / "first").read_text()
    assert f"=== server pid {first['pid']} (pre-forked, imports done)" in log and "serving " in log
    assert "pre-forked" not in (tmp_path / "second").read_text()


def test_dev_mode_reachable_from_other_hosts_is_warned_about(recwarn):
    exposed = [
        ServerConfig(backend="vllm", urls=["http://gpu-node:8000"]),
        ServerConfig(backend="vllm", urls=["http://127.0.0.1:8000", "http://10.1.2.3:8000"], sync="reload"),
        ServerConfig(backend="vllm", host="0.0.0.0"),
    ]
    for config in exposed:
        with pytest.warns(UserWarning, match="without its API key check") as caught:
            ManagedServer(config, model="m")
        hosts = [h for h in ("gpu-node", "10.1.2.3", "0.0.0.0") if h in str(caught[0].message)]
        assert len(hosts) == 1
    quiet = [
        ServerConfig(backend="vllm", urls=["http://localhost:8000", "http://[::1]:8000"]),
        ServerConfig(backend="vllm"),  # a launched server binds 127.0.0.1
        ServerConfig(backend="vllm", host="0.0.0.0", sync="restart"),  # no dev mode
        ServerConfig(backend="sglang", urls=["http://gpu-node:30000"]),
    ]
    recwarn.clear()
    for config in quiet:
        ManagedServer(config, model="m")
    assert not [w for w in recwarn if "API key check" in str(w.message)]


def test_launch_does_not_import_weight_sync():
    # weight_sync builds on launch, never the other way: one direction, no cycle.
    code = (
        "import sys; import grpo_lightning.inference.launch as launch; "
        "assert 'grpo_lightning.inference.weight_sync' not in sys.modules; "
        "from grpo_lightning.inference import weight_sync; "
        "assert launch.ManagedServer.adapter_loader is weight_sync.load_adapter"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
