"""Managed inference servers: launch, wait for health, log to a file, always stop; or attach.

    with ManagedServer(ServerConfig(backend="builtin"), model="tiny-sat", log_path=run_dir / "server.log") as server:
        client = server.client()

A managed server runs as a subprocess in its own process group, so that stopping it (SIGTERM,
then SIGKILL after ``stop_timeout``) also reaches the workers vLLM and SGLang spawn. Servers
are stopped on normal exit, on exceptions (context manager), on Ctrl-C, at interpreter exit
and on SIGTERM/SIGHUP to the trainer; the built-in server also exits by itself when its
parent process disappears (``--parent-pid``), which covers a trainer killed with SIGKILL.

With ``ServerConfig.urls`` set, nothing is launched: the servers at those URLs are used as
they are and never stopped by us.

``server_argv`` is the one place that spells out the vLLM / SGLang / built-in command lines.
Weight sync (``weight_sync.py``) builds on this module and not the other way round.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import httpx

from . import prefork
from .client import (
    GenerationRequest,
    RolloutClient,
    SamplingParams,
    ServerUnavailable,
    auth_headers,
    ssl_context,
)
from .retry import RetryPolicy

__all__ = [
    "ManagedServer",
    "ServerConfig",
    "ServerUnavailable",
    "free_port",
    "server_argv",
    "server_env",
]

@dataclass
class ServerConfig:
    """How to run (or reach) the inference servers.

    Args:
        backend: Server implementation: ``builtin`` (transformers, CPU or GPU), ``vllm`` or ``sglang``.
        urls: Base URLs of servers that are already running; when set nothing is launched
            and the servers are never stopped by us.
        host: Address a launched server binds; keep 127.0.0.1 unless other machines must reach it.
        port: Port of a launched server; None picks a free one.
        device: ``auto``, ``cpu`` or ``cuda`` (built-in server only; vLLM/SGLang need a GPU).
        gpu: GPUs the server is pinned to through CUDA_VISIBLE_DEVICES, counted among the GPUs
            this process sees: a list of indices, or one index (the first of
            ``tensor_parallel_size * data_parallel_size`` consecutive GPUs); None leaves it unset.
        tensor_parallel_size: GPUs one copy of the model is split over (vLLM
            ``--tensor-parallel-size``, SGLang ``--tp-size``); must divide the GPU set.
        data_parallel_size: Model copies the server runs side by side, each on
            ``tensor_parallel_size`` GPUs (vLLM ``--data-parallel-size``, SGLang ``--dp-size``);
            None: as many as the GPU set holds (1 without a list in ``gpu``).
        dtype: Weights dtype: ``auto``, ``float32``, ``bfloat16`` (passed to vLLM/SGLang as given).
        gpu_memory_utilization: Fraction of GPU memory vLLM (``--gpu-memory-utilization``) or
            SGLang (``--mem-fraction-static``) may take.
        max_model_len: Prompt + completion token limit; None uses the model's.
        max_num_seqs: Sequences decoded together (vLLM ``--max-num-seqs``, SGLang
            ``--max-running-requests``, built-in ``--max-batch-size``).
        served_model_name: Name clients send as ``model``; None uses the model path first launched.
        api_key: Bearer token the server requires and the client sends; None disables auth,
            unless a launched server would read its key from our environment
            (``GRPO_LIGHTNING_API_KEY`` for built-in, ``VLLM_API_KEY`` for vLLM): that key is
            then sent. The environment keeps the key out of the run's ``config.yaml``.
        startup_timeout: Seconds to wait for a launched server to become healthy.
        request_timeout: Seconds allowed for one generation HTTP request.
        max_retries: Retries of a failed generation request (connection error, timeout, 5xx)
            and of a weight-sync request that got no answer.
        backoff: Seconds before the first retry; doubles at each retry. Together with
            ``max_retries`` this is the retry budget: a launched server that stays down or hung
            for longer is restarted on the current weights (at most ``max_restarts`` times in a
            row); when an attached server does, the run stops (resume with ``--ckpt_path last``).
        max_restarts: Restarts of a launched server that crashed or hung during one generation
            round before the run stops; 0 never restarts.
        max_concurrency: Generation requests in flight at once, over all servers.
        sync: How new weights reach the server: ``auto`` (disk for built-in/SGLang, dev-mode
            reload for vLLM with restart as fallback), ``disk`` (``/update_weights_from_disk``),
            ``reload`` (vLLM ``/collective_rpc``), or ``restart``.
        verify_tolerance: Largest allowed difference between server and trainer logprobs
            when a weight sync is verified with a probe.
        deterministic: SGLang only: add ``--enable-deterministic-inference``, without which
            SGLang ignores per-request sampling seeds.
        stop_timeout: Seconds a server gets to exit after SIGTERM before it is killed.
        extra_args: Additional command-line arguments appended to the server's command.
        env: Additional environment variables for the server process.
        python: Interpreter that runs a launched server: an absolute path, a name on ``PATH``,
            or a wrapper script that ends by running ``python "$@"`` (e.g. inside a container).
            None uses the trainer's own. Lets vLLM/SGLang come from an environment of their own
            whose torch differs from the trainer's; the built-in server then needs
            grpo-lightning installed there too.
    """

    backend: Literal["builtin", "vllm", "sglang"] = "builtin"
    urls: list[str] | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu: int | list[int] | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None
    max_num_seqs: int = 64
    served_model_name: str | None = None
    api_key: str | None = None
    startup_timeout: float = 180.0
    request_timeout: float = 120.0
    max_retries: int = 5
    backoff: float = 0.5
    max_restarts: int = 3
    max_concurrency: int = 64
    sync: Literal["auto", "disk", "restart", "reload"] = "auto"
    verify_tolerance: float = 0.05
    deterministic: bool = False
    stop_timeout: float = 15.0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None


# Where a launched server reads its API key from the environment it inherits.
KEY_ENV = {"builtin": "GRPO_LIGHTNING_API_KEY", "vllm": "VLLM_API_KEY"}
HEALTH_PATHS = {"builtin": "/health", "vllm": "/v1/models", "sglang": "/v1/models"}


def server_argv(
    config: ServerConfig,
    model: str,
    port: int,
    served_model_name: str | None = None,
    trust_remote_code: bool = False,
) -> list[str]:
    """The command that launches ``config.backend`` on ``model`` (API keys go through ``server_env``).

    ``trust_remote_code`` follows the trainer's ``model.trust_remote_code``: a model that needs
    its own code to train needs it to serve, and nothing else turns it on.
    """
    name = served_model_name or config.served_model_name or model
    common = ["--host", config.host, "--port", str(port), "--served-model-name", name]
    python = config.python or sys.executable
    if config.backend == "builtin":
        argv = [python, "-m", "grpo_lightning.inference.server", "--model", model, *common]
        argv += [
            "--device",
            config.device,
            "--dtype",
            config.dtype,
            "--max-batch-size",
            str(config.max_num_seqs),
        ]
        argv += ["--parent-pid", str(os.getpid())]
        if config.max_model_len:
            argv += ["--max-model-len", str(config.max_model_len)]
    elif config.backend == "vllm":
        # ``vllm serve MODEL`` (the module form works where no ``vllm`` script is on PATH);
        # ``vllm.entrypoints.openai.api_server`` is deprecated.
        argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", model, *common]
        argv += [
            "--dtype",
            config.dtype,
            "--gpu-memory-utilization",
            str(config.gpu_memory_utilization),
        ]
        argv += ["--max-num-seqs", str(config.max_num_seqs)]
        # Logprobs after temperature/top-k/top-p: the behaviour policy the trainer divides by.
        argv += ["--logprobs-mode", "processed_logprobs"]
        if config.max_model_len:
            argv += ["--max-model-len", str(config.max_model_len)]
        argv += _parallel_args(config, "--tensor-parallel-size", "--data-parallel-size")
    elif config.backend == "sglang":
        argv = [python, "-m", "sglang.launch_server", "--model-path", model, *common]
        argv += [
            "--dtype",
            config.dtype,
            "--mem-fraction-static",
            str(config.gpu_memory_utilization),
        ]
        argv += ["--max-running-requests", str(config.max_num_seqs)]
        if config.max_model_len:
            argv += ["--context-length", str(config.max_model_len)]
        if config.api_key:
            argv += ["--api-key", config.api_key]
        if config.deterministic:
            argv += ["--enable-deterministic-inference"]
        argv += _parallel_args(config, "--tp-size", "--dp-size")
    else:
        raise ValueError(f"unknown backend {config.backend!r}")
    if trust_remote_code:
        argv += ["--trust-remote-code"]  # the same flag name in all three servers
    return argv + list(config.extra_args)


def _parallel_args(config: ServerConfig, tp_flag: str, dp_flag: str) -> list[str]:
    args = [tp_flag, str(config.tensor_parallel_size)] if config.tensor_parallel_size > 1 else []
    dp = data_parallel_size(config)
    return args + ([dp_flag, str(dp)] if dp > 1 else [])


def data_parallel_size(config: ServerConfig) -> int:
    """The server's model copies: ``data_parallel_size``, or as many as the GPU list holds."""
    if config.data_parallel_size is not None:
        return config.data_parallel_size
    if isinstance(config.gpu, list):
        return max(1, len(config.gpu) // config.tensor_parallel_size)
    return 1


def server_gpus(config: ServerConfig) -> list[int] | None:
    """The GPU indices (among those this process sees) a launched server gets; None: not pinned."""
    if config.gpu is None:
        return None
    if isinstance(config.gpu, list):
        return list(config.gpu)
    return list(range(config.gpu, config.gpu + config.tensor_parallel_size * data_parallel_size(config)))


def check_parallel(config: ServerConfig) -> None:
    """One-line errors for GPU sets and parallel sizes that cannot work, before anything starts."""
    tp, dp = config.tensor_parallel_size, config.data_parallel_size
    if tp < 1 or (dp is not None and dp < 1):
        raise ValueError(
            f"data.server.tensor_parallel_size={tp} and data.server.data_parallel_size={dp} must be at least 1"
        )
    if (tp > 1 or data_parallel_size(config) > 1) and config.backend == "builtin" and not config.urls:
        raise ValueError(
            f"data.server.tensor_parallel_size={tp} / data.server.data_parallel_size={dp}: "
            f"data.server.backend=builtin runs one model on one device; use vllm or sglang"
        )
    if isinstance(config.gpu, list):
        if not config.gpu or len(set(config.gpu)) != len(config.gpu) or min(config.gpu) < 0:
            raise ValueError(f"data.server.gpu={config.gpu} must list distinct GPU indices")
        if len(config.gpu) % tp:
            raise ValueError(
                f"data.server.tensor_parallel_size={tp} does not divide the {len(config.gpu)} GPUs "
                f"of data.server.gpu={config.gpu}"
            )
        if dp is not None and tp * dp != len(config.gpu):
            raise ValueError(
                f"data.server.tensor_parallel_size={tp} x data.server.data_parallel_size={dp} = {tp * dp} GPUs, "
                f"but data.server.gpu={config.gpu} lists {len(config.gpu)}"
            )
    elif config.gpu is not None and config.gpu < 0:
        raise ValueError(f"data.server.gpu={config.gpu} must be a GPU index (0 or more)")


def visible_gpu_count() -> int:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else the machine's."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible:
        return len(visible)
    import torch

    return torch.cuda.device_count()


# vllm/config/lora.py, ``MaxLoRARanks``: the only values ``--max-lora-rank`` accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_server_argv(backend: str, rank: int, target_modules: list[str]) -> list[str]:
    """Launch flags that let a server take LoRA adapters of ``rank`` at run time (added to
    ``server_argv``'s command by ``ManagedServer``; the built-in server always takes them).

    Two adapters at once: the trainer loads the new one before dropping the old one, so a
    sync never leaves the server without the policy's adapter.
    """
    if backend == "vllm":
        cap = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
        if cap is None:
            raise ValueError(f"model.lora.rank={rank} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
        return ["--enable-lora", "--max-lora-rank", str(cap), "--max-loras", "2"]
    if backend == "sglang":
        return ["--enable-lora", "--max-lora-rank", str(rank), "--lora-target-modules", *target_modules,
                "--max-loras-per-batch", "2"]
    return []


def lora_server_env(backend: str) -> dict[str, str]:
    """vLLM only mounts ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` with this set
    (vllm/entrypoints/serve/lora/api_router.py, ``attach_router``)."""
    return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if backend == "vllm" else {}


def check_gpus_exist(config: ServerConfig) -> None:
    """A one-line error when the server's GPU set asks for more GPUs than this machine has."""
    gpus = server_gpus(config)
    if gpus is None:
        return
    check_parallel(config)
    count = visible_gpu_count()
    if max(gpus) >= count:
        raise ValueError(
            f"data.server.gpu={config.gpu} with data.server.tensor_parallel_size={config.tensor_parallel_size} "
            f"asks for GPUs {gpus}, but only {count} exist here"
        )


def server_env(config: ServerConfig) -> dict[str, str]:
    """Environment additions for the server process."""
    env: dict[str, str] = {}
    gpus = server_gpus(config)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(physical_gpu(i) for i in gpus)
    if config.backend in KEY_ENV and config.api_key:
        env[KEY_ENV[config.backend]] = config.api_key  # kept off the command line (ps)
    if config.backend == "vllm" and config.sync in ("auto", "reload"):
        # Enables /collective_rpc and /reset_prefix_cache for in-place weight reloads.
        env["VLLM_SERVER_DEV_MODE"] = "1"
    env.update(config.env)
    return env


def uses_vllm_dev_mode(config: ServerConfig) -> bool:
    """True when weights reach vLLM through its dev-mode routes (``/collective_rpc`` ...)."""
    return config.backend == "vllm" and config.sync in ("auto", "reload")


def exposed_dev_mode_hosts(config: ServerConfig) -> list[str]:
    """Hosts of vLLM servers in dev mode that other machines may reach.

    vLLM checks its API key only on ``/v1/...`` paths: ``/collective_rpc``, which runs any worker
    method, and the other dev-mode routes answer anyone who reaches the port.
    """
    if not uses_vllm_dev_mode(config):
        return []
    hosts = [httpx.URL(u).host for u in config.urls] if config.urls else [config.host]
    return [h for h in hosts if not _is_loopback(h)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def physical_gpu(index: int) -> str:
    """The device id of the ``index``-th GPU this process sees (``CUDA_VISIBLE_DEVICES`` counts
    from the machine's GPUs, so a server started by a pinned trainer must be mapped through it)."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return str(index)
    if index >= len(visible):
        raise ValueError(f"data.server.gpu={index} but only {len(visible)} GPUs are visible ({','.join(visible)})")
    return visible[index]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class ManagedServer:
    """A server process we own (or servers we attach to), usable as a context manager."""

    adapter_loader: ClassVar[Callable[[ManagedServer, str, str], None] | None] = None
    """``(server, folder, name)``: loads a LoRA adapter on the servers. Set by ``weight_sync``
    (whose ``load_adapter`` it is, and which sets ``adapter``): this module starts processes and
    knows no weight routes."""

    def __init__(
        self,
        config: ServerConfig,
        model: str | None = None,
        log_path: str | Path | None = None,
        trust_remote_code: bool = False,
        lora: tuple[int, list[str]] | None = None,
    ) -> None:
        """``lora``: (rank, target modules) of the adapters the trainer will send, which a
        launched server must be started to accept; None for full-weight training."""
        inherited = os.environ.get(KEY_ENV.get(config.backend, ""), "")
        if not config.urls and config.api_key is None and inherited:
            # The launched server inherits our environment and enforces that key: send it too.
            config = dataclasses.replace(config, api_key=inherited)
        self.config = config
        self.model = model
        self.trust_remote_code = trust_remote_code
        if not config.urls and model is None:
            raise ValueError(
                "ManagedServer needs a model to launch (or ServerConfig.urls to attach)"
            )
        if not config.urls and config.python and shutil.which(config.python) is None:
            raise ValueError(
                f"data.server.python={config.python!r} is not an executable file or a command on PATH"
            )
        if exposed := exposed_dev_mode_hosts(config):
            warnings.warn(
                f"vLLM weight sync uses its dev-mode routes (/collective_rpc, /reset_prefix_cache), "
                f"which vLLM serves without its API key check, on {', '.join(exposed)}: anyone "
                "reaching that port can run worker methods. Keep the server on 127.0.0.1 (an SSH "
                "tunnel or a firewalled network for remote GPUs), or launch it with data.server.sync=restart",
                stacklevel=2,
            )
        self.port = config.port
        self.log_path = (
            Path(log_path)
            if log_path
            else Path(tempfile.gettempdir()) / f"grpo-lightning-{config.backend}-{os.getpid()}.log"
        )
        # Fixed at first launch so that a restart on a new checkpoint keeps the client's model
        # name; unknown for attached servers unless configured (clients then ask /v1/models).
        self.served_model_name = config.served_model_name or (None if config.urls else model)
        self.served_weights: str | None = None
        """The folder ``sync_weights`` last pushed: what ``recover`` restarts on."""
        self.recoveries = 0
        """Restarts after a crash, a hang or a failed in-place weight update (``recover``)."""
        self.lora = lora
        self.adapter: tuple[str, str] | None = None
        """(name, folder) of the LoRA adapter last loaded by ``weight_sync.sync_adapter``:
        requests name it, and a restarted server gets it loaded again."""
        self._proc: subprocess.Popen | prefork.PreforkedProcess | None = None
        self._log = None

    # ------------------------------------------------------------------ properties
    @property
    def managed(self) -> bool:
        """True when we launched the server (and so stop and restart it)."""
        return not self.config.urls

    @property
    def urls(self) -> list[str]:
        if not self.managed:
            return [u.rstrip("/") for u in self.config.urls or []]
        return [f"http://{_client_host(self.config.host)}:{self.port}"]

    @property
    def exit_code(self) -> int | None:
        """The launched server's exit code once its process has ended (it crashed or was
        killed); None while it runs, and for attached servers."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def pid(self) -> int | None:
        """Process id of the launched server (its process group id too)."""
        return self._proc.pid if self._proc is not None else None

    def client(self, tokenizer=None, **overrides) -> RolloutClient:
        """A ``RolloutClient`` for these servers, with this config's timeouts and retries."""
        kwargs = dict(
            adapter=self.adapter[0] if self.adapter is not None else None,
            backend=self.config.backend,
            model=self.served_model_name,
            api_key=self.config.api_key,
            max_concurrency=self.config.max_concurrency,
            request_timeout=self.config.request_timeout,
            max_retries=self.config.max_retries,
            backoff=self.config.backoff,
            tokenizer=tokenizer,
        )
        kwargs.update(overrides)
        return RolloutClient(self.urls, **kwargs)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ManagedServer:
        """Launch (when managed) and return once every server answers; raise ServerUnavailable otherwise."""
        if self.managed and (self._proc is None or self._proc.poll() is not None):
            self._launch()
        try:
            self._wait_healthy()
            self._warm_up()
            if self.managed and self.adapter is not None:
                self._reload_adapter()
        except BaseException:
            self.stop()
            raise
        return self

    def _reload_adapter(self) -> None:
        # A restarted process has lost its adapters: it must serve the policy again, not the base.
        load = type(self).adapter_loader
        assert self.adapter is not None and load is not None
        name, folder = self.adapter
        try:
            load(self, folder, name)
        except RuntimeError as exc:  # refused (WeightSyncError) or gone again (ServerUnavailable)
            raise ServerUnavailable(f"the restarted server did not take the adapter {folder}: {exc}") from exc

    def stop(self) -> None:
        """Stop a launched server and everything in its process group; no-op when attached."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                signal_group(proc.pid, signal.SIGTERM)
                # A stopped (SIGSTOP) server only sees the SIGTERM once it runs again.
                signal_group(proc.pid, signal.SIGCONT)
                try:
                    proc.wait(timeout=self.config.stop_timeout)
                except subprocess.TimeoutExpired:
                    signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
                # Workers that outlived the leader (vLLM/SGLang engine processes) go too.
                signal_group(proc.pid, signal.SIGKILL)
            finally:
                _LIVE.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, model: str | None = None) -> float:
        """Stop and start again, optionally on a new checkpoint; returns the seconds it took."""
        if not self.managed:
            raise RuntimeError(f"cannot restart servers we attached to ({', '.join(self.urls)})")
        start = time.perf_counter()
        self.stop()
        if model is not None:
            self.model = str(model)
        self.start()
        return time.perf_counter() - start

    def recover(self, model: str | None = None) -> float:
        """Restart a launched server that crashed, hung or failed to take new weights, on
        ``model`` (default: the weights it served: the folder last pushed by ``sync_weights``,
        else the model it was launched with); counted in ``recoveries``."""
        self.recoveries += 1
        return self.restart(model=model or self.served_weights)

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals
    def _launch(self) -> None:
        assert self.model is not None
        if self.port is None:
            self.port = free_port(self.config.host)
        argv = server_argv(
            self.config, self.model, self.port, self.served_model_name, self.trust_remote_code
        )
        if self.lora is not None:
            argv += lora_server_argv(self.config.backend, *self.lora)
        check_gpus_exist(self.config)
        env = {**os.environ, **server_env(self.config)}
        if self.lora is not None:
            env.update(lora_server_env(self.config.backend))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        shown = " ".join("***" if a == self.config.api_key else a for a in argv)
        self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shown}\n".encode())
        self._log.flush()
        _install_cleanup_hooks()
        # A sweep trial has a process ready that imported the built-in server already.
        self._proc = prefork.spawn(argv, env, self.log_path) or subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        _LIVE.add(self)
        how = " (pre-forked, imports done)" if isinstance(self._proc, prefork.PreforkedProcess) else ""
        self._log.write(f"=== server pid {self._proc.pid}{how}\n".encode())
        self._log.flush()

    def _wait_healthy(self) -> None:
        # Polled often at first (a small model is up in seconds), then every half second, until
        # every URL answers 200 or startup_timeout has passed. A launched process that exits
        # ends the wait at once: no later poll can succeed.
        polling = RetryPolicy(
            max_retries=None, backoff=0.1, growth=1.5, max_backoff=0.5, deadline=self.config.startup_timeout
        )
        path = HEALTH_PATHS[self.config.backend]
        pending = list(self.urls)

        def give_up(last: BaseException, attempts: int) -> ServerUnavailable:
            return ServerUnavailable(
                f"{self.config.backend} server at {pending[0]} not healthy after "
                f"{self.config.startup_timeout:g}s ({last}); {self._log_tail()}"
            )

        with httpx.Client(timeout=5.0, headers=auth_headers(self.config.api_key), verify=ssl_context()) as http:
            polling.call(lambda _: self._poll_health(http, pending, path), _NotHealthy, give_up)

    def _poll_health(self, http: httpx.Client, pending: list[str], path: str) -> None:
        """Remove the URLs that answer healthy from ``pending``; raise ``_NotHealthy`` with the
        cause while one does not."""
        if self._proc is not None and self._proc.poll() is not None:
            raise ServerUnavailable(
                f"{self.config.backend} server at {pending[0]} exited with code {self._proc.returncode} "
                f"during startup; {self._log_tail()}"
            )
        while pending:
            try:
                r = http.get(f"{pending[0]}{path}")
            except httpx.HTTPError as exc:
                raise _NotHealthy(f"{type(exc).__name__}: {exc}") from None
            if r.status_code != 200:
                raise _NotHealthy(f"HTTP {r.status_code} from {path}")
            pending.pop(0)

    def _warm_up(self) -> None:
        # One 1-token generation: the first request pays for lazy initialisation, and a
        # server that answers health checks but cannot generate is caught here.
        request = GenerationRequest(
            prompt_ids=[0], n=1, seed=0, params=SamplingParams(max_tokens=1)
        )
        try:
            self.client(max_retries=2, backoff=0.2, adapter=None).generate([request])
        except Exception as exc:  # reported as one line with the log's tail
            raise ServerUnavailable(
                f"{self.config.backend} server at {self.urls[0]} cannot generate: {exc}; {self._log_tail()}"
            ) from None

    def _log_tail(self, lines: int = 5) -> str:
        if not self.managed:
            return "attached server, no log"
        try:
            text = self.log_path.read_bytes()[-8192:].decode(errors="replace")
        except OSError:
            return f"log {self.log_path} unreadable"
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        return f"log {self.log_path}: " + " | ".join(tail)


class _NotHealthy(Exception):
    """A health poll that did not get 200 (yet); its message is the cause."""


def signal_group(pgid: int, sig: int) -> None:
    """Signal a process group that may be gone already, or not formed yet: a forked sweep
    trial calls ``setsid`` itself, so a signal sent before that reaches the process alone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pgid, sig)
    except PermissionError:
        pass


# ---------------------------------------------------------------------- no orphans
_LIVE: set[ManagedServer] = set()
_hooks_lock = threading.Lock()
_hooks_installed = False


def _stop_all() -> None:
    for server in list(_LIVE):
        # Best effort while exiting: one failure must not leave the other servers running.
        with contextlib.suppress(Exception):
            server.stop()


def _on_signal(previous, signum, frame) -> None:
    _stop_all()
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        # Die the way the signal intended, now that no server is left behind.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_cleanup_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(_stop_all)
        # Signal handlers can only be set from the main thread; atexit still covers the rest.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, functools.partial(_on_signal, signal.getsignal(sig)))
