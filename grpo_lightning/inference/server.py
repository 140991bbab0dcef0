"""The built-in generation server: FastAPI over the batched engine, vLLM/OpenAI compatible.

    python -m grpo_lightning serve --model tiny-sat --port 8000
    python -m grpo_lightning.inference.server --model tiny-sat --port 8000   # same, no CLI

Routes:

* ``POST /v1/completions`` - OpenAI completions with vLLM's extras: token-id prompts,
  ``return_token_ids`` (``choices[].token_ids`` with EOS included, ``choices[].prompt_token_ids``),
  ``logprobs`` of the processed sampling distribution, ``top_k``, ``min_tokens``,
  ``stop_token_ids``, ``ignore_eos``, ``seed`` (choice ``i`` is sampled with ``seed + i``, vLLM's
  rule). ``system_fingerprint`` carries the served weights' checksum.
* ``GET /health``, ``GET /v1/models``.
* ``POST /update_weights_from_disk {"model_path": ...}`` - SGLang's route and answer; returns
  once the new weights serve. ``GET /get_model_info`` reports the served weights' checksum
  (see ``weights.folder_checksum``) and version.
* ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter
  {"lora_name"}`` - vLLM's routes for a PEFT adapter folder. One adapter at a time: it is merged
  into the base weights (``lora.merge_adapter``; a new adapter replaces the previous one). The
  base weights of the adapted layers are kept in host memory at the first adapter, so a new
  adapter costs reading the adapter and one merge, never a read of the base. Requests then name
  it as their ``model``, and the checksum is ``lora.with_adapter_checksum`` of the base's and
  the applied adapter's (``lora.adapter_checksum``): verifying costs the adapter's size.

Every malformed or out-of-range request gets a 4xx with a message; the server binds
127.0.0.1 unless told otherwise; with ``--api-key`` (or ``GRPO_LIGHTNING_API_KEY``) every
route but ``/health`` needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from .protocol import (
    CompletionRequest,
    LoadLoRAAdapterRequest,
    SamplingOptions,
    UnloadLoRAAdapterRequest,
    UpdateWeightsRequest,
    error_body,
)

if TYPE_CHECKING:
    # torch loads lazily: a bad command line fails in a second, not after the torch import.
    from collections.abc import Callable

    import torch

    from .engine import GenerationEngine, SequenceOutput

log = logging.getLogger("grpo_lightning.server")
ModelT = TypeVar("ModelT", bound=BaseModel)

API_KEY_ENV = "GRPO_LIGHTNING_API_KEY"


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; anything beyond gets a 4xx."""

    served_model_name: str
    max_model_len: int
    max_tokens: int
    max_n: int = 64
    max_prompts: int = 256
    max_request_bytes: int = 16 << 20
    max_logprobs: int = 20
    api_key: str | None = None


class ApiError(Exception):
    """An error with an HTTP status, rendered in OpenAI's error envelope."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "invalid request: " + "; ".join(parts)


async def _read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def _parse(request: Request, model: type[ModelT], limit: int) -> ModelT:
    """The request body as ``model``, or a 4xx naming what is wrong with it."""
    body = await _read_json(request, limit)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, _describe(exc)) from None


class _TokenPieces:
    """Decoded text of single tokens, cached: logprob answers name every token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self.cache[token]


def _options(
    req: CompletionRequest, prompt_lens: list[int], limits: ServerLimits, vocab: int
) -> SamplingOptions:
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be in [1, {limits.max_tokens}], got {max_tokens}")
    longest = max(prompt_lens)
    if longest >= limits.max_model_len:
        raise ApiError(
            400,
            f"prompt of {longest} tokens is too long: this model's maximum context length is "
            f"{limits.max_model_len} tokens",
        )
    if longest + max_tokens > limits.max_model_len:
        raise ApiError(
            400,
            f"this model's maximum context length is {limits.max_model_len} tokens, but "
            f"{longest} prompt tokens + {max_tokens} max_tokens were requested",
        )
    temperature = 1.0 if req.temperature is None else req.temperature
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ApiError(400, f"temperature must be a finite number >= 0, got {temperature}")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}")
    top_k = 0 if req.top_k is None or req.top_k == -1 else req.top_k
    if top_k < 0:
        raise ApiError(400, f"top_k must be -1 or 0 (off) or >= 1, got {req.top_k}")
    min_tokens = req.min_tokens or 0
    if not 0 <= min_tokens <= max_tokens:
        raise ApiError(400, f"min_tokens must be in [0, max_tokens], got {min_tokens}")
    top_logprobs = req.logprobs or 0
    if req.logprobs is not None and not 0 <= req.logprobs <= limits.max_logprobs:
        raise ApiError(400, f"logprobs must be in [0, {limits.max_logprobs}], got {req.logprobs}")
    stops = req.stop_token_ids or []
    if any(not 0 <= t < vocab for t in stops):
        raise ApiError(400, f"stop_token_ids must be token ids in [0, {vocab})")
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_tokens=min_tokens,
        stop_token_ids=frozenset(stops),
        ignore_eos=bool(req.ignore_eos),
        top_logprobs=top_logprobs,
    )


def _prompts(
    req: CompletionRequest, tokenizer, vocab: int, limits: ServerLimits
) -> list[list[int]]:
    raw = req.prompt
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not items:
        raise ApiError(400, "prompt must not be empty")
    if len(items) > limits.max_prompts:
        raise ApiError(400, f"at most {limits.max_prompts} prompts per request, got {len(items)}")
    special = True if req.add_special_tokens is None else req.add_special_tokens
    prompts = [
        tokenizer(p, add_special_tokens=special)["input_ids"] if isinstance(p, str) else list(p)
        for p in items
    ]
    for p in prompts:
        if not p:
            raise ApiError(400, "prompt must not be empty")
        if any(not 0 <= t < vocab for t in p):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})")
    return prompts


def _choice(index, prompt, out: SequenceOutput, req: CompletionRequest, tokenizer, piece) -> dict:
    skip = True if req.skip_special_tokens is None else req.skip_special_tokens
    choice: dict = {
        "index": index,
        "text": tokenizer.decode(out.token_ids, skip_special_tokens=skip),
        "logprobs": None,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
    }
    if req.logprobs is not None:
        tokens = [piece(t) for t in out.token_ids]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        choice["logprobs"] = {
            "tokens": tokens,
            "token_logprobs": out.logprobs,
            "top_logprobs": [{piece(t): lp for t, lp in row} for row in out.top_logprobs]
            if out.top_logprobs
            else None,
            "text_offset": offsets,
        }
    if req.return_token_ids:
        choice["token_ids"] = out.token_ids
        choice["prompt_token_ids"] = prompt
    return choice


def create_app(engine: GenerationEngine, tokenizer, limits: ServerLimits) -> FastAPI:
    """The FastAPI app; the caller owns the engine's lifetime."""
    app = FastAPI(title="grpo-lightning inference server", docs_url=None, redoc_url=None)
    piece = _TokenPieces(tokenizer)
    update_lock = asyncio.Lock()
    adapter: dict = {"name": None, "keys": set(), "base_weights": {}, "base_checksum": engine.checksum}
    """The merged adapter's name, the weights it changed, the base weights of every weight an
    adapter changed so far (kept on the CPU, so that the next adapter merges without reading
    the base again), and the base weights' checksum."""

    def served_name() -> str:
        return adapter["name"] or limits.served_model_name

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message), status_code=exc.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if limits.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {limits.api_key}".encode()):
                return JSONResponse(error_body(401, "missing or invalid API key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return JSONResponse(
                error_body(503, "the generation engine is not running"), status_code=503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": served_name(),
                    "object": "model",
                    "created": 0,
                    "owned_by": "grpo-lightning",
                    "root": engine.model_path,
                    "max_model_len": limits.max_model_len,
                }
            ],
        }

    @app.get("/get_model_info")
    async def model_info() -> dict:
        running, waiting = engine.load
        return {
            "model_path": engine.model_path,
            "served_model_name": limits.served_model_name,
            "is_generation": True,
            "checksum": engine.checksum,
            "weights_version": engine.weights_version,
            "lora_adapter": adapter["name"],
            "dtype": str(engine.dtype).removeprefix("torch."),
            "device": str(engine.device),
            "max_model_len": limits.max_model_len,
            "running": running,
            "waiting": waiting,
            "swap_pending": engine.swap_pending,
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        req = await _parse(request, CompletionRequest, limits.max_request_bytes)
        if req.model is not None and req.model != served_name():
            raise ApiError(
                404,
                f"the model `{req.model}` does not exist; this server serves `{served_name()}`",
            )
        if req.stream:
            raise ApiError(400, "stream=true is not supported by this server")
        if req.echo:
            raise ApiError(400, "echo=true is not supported by this server")
        if req.stop:
            raise ApiError(400, "stop strings are not supported; use stop_token_ids")
        n = 1 if req.n is None else req.n
        if not 1 <= n <= limits.max_n:
            raise ApiError(400, f"n must be in [1, {limits.max_n}], got {n}")
        seed = req.seed
        if seed is not None and not -(1 << 63) <= seed < (1 << 63):
            raise ApiError(400, "seed must fit in a signed 64-bit integer")
        vocab = engine.vocab_size
        prompts = _prompts(req, tokenizer, vocab, limits)
        options = _options(req, [len(p) for p in prompts], limits, vocab)
        expanded = [p for p in prompts for _ in range(n)]
        seeds = [None if seed is None else seed + i for _ in prompts for i in range(n)]
        if not engine.alive:
            raise ApiError(503, "the generation engine is not running")
        try:
            outputs = await engine.generate(expanded, options, seeds)
        except Exception as exc:  # the engine failed a step (e.g. out of memory): retryable
            raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}") from exc
        choices = [
            _choice(k, expanded[k], out, req, tokenizer, piece) for k, out in enumerate(outputs)
        ]
        completion_tokens = sum(len(o.token_ids) for o in outputs)
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": limits.served_model_name,
            "system_fingerprint": engine.checksum,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request) -> JSONResponse:
        from .weights import load_checkpoint, state_dict_checksum

        path = (await _parse(request, UpdateWeightsRequest, limits.max_request_bytes)).model_path
        async with update_lock:
            start = time.perf_counter()
            try:
                tensors = await asyncio.to_thread(load_checkpoint, path, engine.dtype)
                engine.check_weights(tensors)
            except (OSError, ValueError) as exc:
                return JSONResponse(
                    {"success": False, "message": f"cannot load weights from {path}: {exc}"},
                    status_code=400,
                )
            checksum = await asyncio.to_thread(state_dict_checksum, tensors)

            def copy_in(model: torch.nn.Module) -> None:
                model.load_state_dict(tensors, strict=False)  # a tied weight (lm_head) is stored once

            try:
                await engine.swap_weights(copy_in, checksum, path)
            except RuntimeError as exc:
                raise ApiError(503, str(exc)) from exc
            adapter.update(name=None, keys=set(), base_weights={}, base_checksum=checksum)
            seconds = time.perf_counter() - start
        log.info("serving weights from %s (checksum %s) after %.2fs", path, checksum, seconds)
        return JSONResponse(
            {
                "success": True,
                "message": f"Succeeded to update model weights from {path}.",
                "num_paused_requests": 0,
                "model_path": path,
                "checksum": checksum,
                "weights_version": engine.weights_version,
                "seconds": seconds,
            }
        )

    def merge(path: str | None) -> tuple[Callable[[torch.nn.Module], None], set, str]:
        """What serving the adapter at ``path`` (None: the base alone) takes: a function that
        merges it into the model's weights in place (run by the engine between steps), the
        weights it changes, and the checksum of what is then served. Runs off the event loop."""
        from ..lora import (
            adapter_checksum,
            check_fits,
            merge_into,
            read_adapter,
            with_adapter_checksum,
        )

        scaling, pairs = read_adapter(path) if path else (1.0, {})
        params = engine.model.state_dict()
        check_fits({k: t.shape for k, t in params.items()}, pairs)
        base = adapter["base_weights"]
        for key in set(pairs) - set(base):
            # Not changed by the adapter now served (those are all kept already): still the base.
            base[key] = params[key].detach().to("cpu", copy=True)
        # Weights the previous adapter changed and this one does not go back to the base.
        restore = adapter["keys"] - set(pairs)

        def apply(_: torch.nn.Module) -> None:
            # ``params`` share their storage with the model's weights: writing them merges in place.
            for key, (a, b) in pairs.items():
                merge_into(params[key], base[key], a, b, scaling)
            for key in restore:
                params[key].copy_(base[key])

        checksum = adapter["base_checksum"]
        return apply, set(pairs), with_adapter_checksum(checksum, adapter_checksum(scaling, pairs)) if path else checksum

    async def set_adapter(name: str | None, path: str | None) -> str:
        """Serve the base weights with the adapter at ``path`` merged (None: the base alone);
        returns the served weights' checksum."""
        apply, keys, checksum = await asyncio.to_thread(merge, path)
        await engine.swap_weights(apply, checksum, engine.model_path)
        adapter.update(name=name, keys=keys)
        return checksum

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> JSONResponse:
        req = await _parse(request, LoadLoRAAdapterRequest, limits.max_request_bytes)
        async with update_lock:
            start = time.perf_counter()
            try:
                checksum = await set_adapter(req.lora_name, req.lora_path)
            except (OSError, ValueError) as exc:
                raise ApiError(400, f"cannot load the LoRA adapter {req.lora_path}: {exc}") from None
            except RuntimeError as exc:
                raise ApiError(503, str(exc)) from exc
        seconds = time.perf_counter() - start
        log.info("serving adapter %s from %s (checksum %s) after %.2fs", req.lora_name, req.lora_path, checksum, seconds)
        return JSONResponse(
            {"success": True, "lora_name": req.lora_name, "checksum": checksum, "weights_version": engine.weights_version,
             "seconds": seconds}
        )

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        req = await _parse(request, UnloadLoRAAdapterRequest, limits.max_request_bytes)
        async with update_lock:
            if req.lora_name != adapter["name"]:
                raise ApiError(404, f"the LoRA adapter '{req.lora_name}' cannot be found")
            try:
                checksum = await set_adapter(None, None)
            except RuntimeError as exc:
                raise ApiError(503, str(exc)) from exc
        return JSONResponse({"success": True, "lora_name": req.lora_name, "checksum": checksum})

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grpo-lightning serve",
        description="Serve a causal LM over HTTP (vLLM-compatible completions).",
    )
    p.add_argument("--model", required=True, help="local HF folder, cached hub id, or tiny-sat")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="name clients pass as 'model' (default: --model as given)",
    )
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + completion tokens (default: the model's max positions)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="largest max_tokens accepted (default: max model len)",
    )
    p.add_argument("--max-n", type=int, default=64, help="largest n accepted")
    p.add_argument("--max-prompts", type=int, default=256, help="most prompts in one request")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20, help="largest request body")
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: half the cores, at most 4)",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process is no longer our parent",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    return p


def _exit_with_parent(pid: int) -> None:
    # A trainer killed with SIGKILL cannot stop us; notice the orphaning and shut down.
    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)
        log.warning("parent process %d is gone; shutting down", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.model.startswith(("/", ".", "~")) and not Path(args.model).expanduser().exists():
        print(f"error: cannot load model {args.model!r}: no such folder", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid)

    import torch
    import uvicorn

    from ..models import load_policy, load_tokenizer, resolve_model_path, stop_token_ids
    from .engine import GenerationEngine
    from .weights import DTYPES, checkpoint_keys, state_dict_checksum

    # Oversubscribed CPU threads spin against each other (10x slower on a shared 2-core box).
    torch.set_num_threads(args.num_threads or max(1, min(4, (os.cpu_count() or 2) // 2)))
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 1
    dtype = (
        DTYPES[args.dtype]
        if args.dtype != "auto"
        else (torch.bfloat16 if device == "cuda" else torch.float32)
    )
    try:
        path = resolve_model_path(args.model)
        tokenizer = load_tokenizer(path, trust_remote_code=args.trust_remote_code, chat=False)
        model = load_policy(
            path, dtype=dtype, trust_remote_code=args.trust_remote_code, device=device
        )
        keys = checkpoint_keys(path) if Path(path).is_dir() else []
    except Exception as exc:  # one readable line for the log a launcher shows
        print(
            f"error: cannot load model {args.model!r}: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return 1
    positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    max_model_len = args.max_model_len or positions
    if max_model_len is None or (positions is not None and max_model_len > positions):
        print(
            f"error: --max-model-len {args.max_model_len} exceeds the model's {positions} positions",
            file=sys.stderr,
        )
        return 1
    params = model.state_dict()
    checksum = state_dict_checksum({k: params[k] for k in keys}) if keys else ""
    engine = GenerationEngine(
        model,
        eos_token_ids=stop_token_ids(tokenizer, path),
        max_batch_size=args.max_batch_size,
        checksum=checksum,
        model_path=path,
    )
    limits = ServerLimits(
        served_model_name=args.served_model_name or args.model,
        max_model_len=max_model_len,
        max_tokens=min(args.max_tokens_limit or max_model_len, max_model_len),
        max_n=args.max_n,
        max_prompts=args.max_prompts,
        max_request_bytes=args.max_request_bytes,
        api_key=args.api_key or None,
    )
    app = create_app(engine, tokenizer, limits)
    engine.start()
    log.info(
        "serving %s (%s, %s, checksum %s) on http://%s:%d",
        path,
        device,
        str(dtype).removeprefix("torch."),
        checksum,
        args.host,
        args.port,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.access_log,
            timeout_graceful_shutdown=5,
        )
    )
    try:
        server.run()
    finally:
        engine.close()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
