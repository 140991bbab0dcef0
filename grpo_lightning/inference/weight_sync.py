"""Pushing the trainer's new weights (an HF folder) to the inference servers, and proving it.

Methods, fastest first:

* ``disk`` (built-in, SGLang): ``POST /update_weights_from_disk {"model_path": DIR}``. The server
  reads the folder and swaps the weights in place; it answers once the new weights serve.
* ``reload`` (vLLM, needs ``VLLM_SERVER_DEV_MODE=1``, which ``launch.server_env`` sets):
  ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}``; vLLM
  versions whose ``reload_weights`` takes no path get ``update_config`` (pointing
  ``model_config.model`` at DIR) followed by ``reload_weights``. Then ``POST /reset_prefix_cache``
  so that no KV computed with the old weights is reused: it answers 200 with
  ``{"success": false}`` while cache blocks are still held, which is retried once and then fails
  the sync (stale KV would otherwise keep serving the old weights). Then
  ``POST /update_weight_version {"new_version": V}`` labels the new weights. vLLM does not pause
  generation for this: sync between rollout phases, with no request in flight (the trainer does).
* ``adapter`` (a PEFT adapter folder, from LoRA training; any backend): ``POST
  /v1/load_lora_adapter`` (built-in, vLLM) or ``/load_lora_adapter`` (SGLang) under a name
  derived from the adapter's weights, then the previous adapter is unloaded and (vLLM, SGLang)
  ``POST /update_weight_version`` labels the new weights; requests name the adapter from then
  on (``ManagedServer.adapter``). A managed server that refuses it is restarted and given the
  adapter again. See ``_sync_adapter``.
* ``restart`` (any managed server): stop it and start it on DIR. Always works; costs a process
  start and a full model load (tens of seconds to minutes on a real model).

``auto`` is ``disk`` for built-in/SGLang and ``reload`` for vLLM, falling back to ``restart``
when the reload route is missing or fails and the server is ours to restart. A server of ours
whose process has exited is restarted on the new weights whatever the method.

After the push the servers are checked, so that training never silently continues against
stale weights: the built-in server's weights checksum must equal the folder's
(``weights.folder_checksum``; for an adapter, ``lora.with_adapter_checksum`` of the base's and
the adapter's, so that verifying costs the adapter's size); vLLM and SGLang label the weights of an in-place update with a
version unique to this sync (SGLang through ``weight_version`` in the update request) and report,
with each completion, the version that sampled it (vLLM's ``weight_versions`` when asked with
``return_weight_versions``, SGLang's ``meta_info``): a short completion must carry the new label.
This catches a server left one step behind, which logprobs alone may not (one optimizer step
moves them by less than any useful tolerance). With a ``probe`` (the trainer's own logprobs for a
(prompt, completion) pair) the same completion's server logprobs must also match the trainer's
within ``tolerance``. A failed check raises ``WeightSyncError``. A vLLM without the version route
(before ``/update_weight_version``) is checked by the probe alone.

A server that does not answer (connection refused or reset, timeout) is retried with the
policy and budget of generation requests (``retry.RetryPolicy``: ``max_retries``, ``backoff``
doubling); once it is spent the sync raises ``ServerUnavailable`` (as a lost generation does),
so the caller can tell a lost server from a refused update (``WeightSyncError``).
"""

from __future__ import annotations

import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from .client import (
    Completion,
    GenerationRequest,
    RolloutClient,
    SamplingParams,
    ServerUnavailable,
    auth_headers,
    ssl_context,
)
from .launch import ManagedServer
from .retry import RetryPolicy

Probe = Callable[[list[int], list[int]], list[float]]
DEFAULT_PROBE_PROMPT = [0, 1, 2, 3, 4, 5, 6, 7]


class WeightSyncError(RuntimeError):
    """New weights could not be pushed, or the server was not shown to serve them."""


@dataclass
class SyncReport:
    """What a weight sync did and how long it took."""

    seconds: float
    """Time to push the weights until the servers answer with them (verification excluded)."""
    method: str
    """``disk``, ``reload`` or ``restart``: the method that actually ran."""
    verified: bool
    """True when a checksum or logprob probe showed the new weights being served."""
    checksum: str | None = None
    """The built-in server's weights checksum after the sync."""
    max_logprob_diff: float | None = None
    """Largest |server - trainer| logprob difference of the probe, when one ran."""
    verify_seconds: float = 0.0
    weight_version: str | None = None
    """The version label every server reported after the sync, when they can report one."""
    adapter: str | None = None
    """The name the LoRA adapter was loaded under (adapter syncs only)."""


def sync_weights(
    server: ManagedServer | str | Sequence[str],
    model_dir: str | Path,
    *,
    backend: str | None = None,
    method: str | None = None,
    api_key: str | None = None,
    probe: Probe | None = None,
    probe_prompt_ids: list[int] | None = None,
    probe_tokens: int = 8,
    tolerance: float | None = None,
    timeout: float = 600.0,
    retry: RetryPolicy | None = None,
    transport: httpx.BaseTransport | None = None,
    version: str | None = None,
) -> SyncReport:
    """Make every server serve the weights in ``model_dir``; raise ``WeightSyncError`` otherwise
    (``ServerUnavailable`` when a server did not answer within ``retry``).

    ``version`` labels the new weights on servers that track one (vLLM, SGLang); None makes a
    label unique to this call, so that a server still on any earlier weights is told apart.

    ``server`` is a ``ManagedServer`` (backend, key, method, tolerance and retry budget come
    from its config) or URLs of servers we do not own (then pass ``backend``; ``restart`` is
    impossible; no retries unless ``retry`` is given).
    """
    managed = None if isinstance(server, (str, list, tuple)) else server
    if managed is not None:
        urls = managed.urls
        backend = backend or managed.config.backend
        api_key = api_key if api_key is not None else managed.config.api_key
        method = method or managed.config.sync
        tolerance = managed.config.verify_tolerance if tolerance is None else tolerance
        retry = retry or RetryPolicy.from_config(managed.config)
    else:
        urls = [server] if isinstance(server, str) else list(server)
        backend = backend or "builtin"
        method = method or "auto"
        tolerance = 0.05 if tolerance is None else tolerance
    retry = retry or RetryPolicy()
    urls = [u.rstrip("/") for u in urls]
    model_dir = str(Path(model_dir).resolve())
    if not Path(model_dir).is_dir():
        raise WeightSyncError(f"no checkpoint folder at {model_dir}")
    chosen = _resolve_method(method, backend, can_restart=managed is not None and managed.managed)
    headers = auth_headers(api_key)
    check = _Check(urls, backend, api_key, retry, transport, probe, probe_prompt_ids or DEFAULT_PROBE_PROMPT,
                   probe_tokens, tolerance)
    if _is_adapter(model_dir):
        return _sync_adapter(managed, check, model_dir, timeout, version)

    version = version or f"{Path(model_dir).name}-{uuid.uuid4().hex[:12]}"
    labelled: list[str] = []  # URLs whose weights now carry ``version``
    start = time.perf_counter()
    if managed is not None and managed.managed and managed.exit_code is not None and chosen != "restart":
        # Nothing can load weights into a process that is gone: start it on them, whatever the method.
        _warn(f"the server process exited (code {managed.exit_code}); restarting it on {model_dir}")
        chosen = "restart"
    with httpx.Client(timeout=timeout, headers=headers, transport=transport, verify=ssl_context()) as http:
        if chosen == "restart":
            _restart(managed, model_dir, recover=method != "restart")
        else:
            try:
                for url in urls:
                    push = _update_from_disk if chosen == "disk" else _vllm_reload
                    if push(http, url, model_dir, retry, version if backend != "builtin" else None):
                        labelled.append(url)
            except (WeightSyncError, ServerUnavailable) as exc:
                if not (method == "auto" and managed is not None and managed.managed):
                    raise
                _warn(f"{exc}; restarting the server instead")
                chosen = "restart"
                labelled = []  # a fresh process serves the folder it was started on
                _restart(managed, model_dir, recover=True)
        seconds = time.perf_counter() - start
        if managed is not None:
            managed.served_weights = model_dir

        report = SyncReport(seconds=seconds, method=chosen, verified=False)
        expected = None
        if backend == "builtin":
            from .weights import folder_checksum

            expected = (model_dir, lambda d: folder_checksum(model_dir, d))
        return _verify(report, http, check, labelled, version, expected)


@dataclass(frozen=True)
class _Check:
    """What verifying a sync needs: the servers, how to reach them, and the probe."""

    urls: list[str]
    backend: str
    api_key: str | None
    retry: RetryPolicy
    transport: httpx.BaseTransport | None
    probe: Probe | None
    prompt: list[int]
    probe_tokens: int
    tolerance: float


def _verify(
    report: SyncReport,
    http: httpx.Client,
    check: _Check,
    labelled: list[str],
    version: str,
    expected: tuple[str, Callable[[str], str]] | None,
    adapter: str | None = None,
) -> SyncReport:
    """Show that every server serves the pushed weights, or raise ``WeightSyncError``: the
    built-in server's checksum against ``expected`` (what was pushed, and its checksum in a
    dtype), the weight version of the servers in ``labelled``, and the probe's logprobs. With
    ``adapter`` the probe asks for that LoRA adapter by name."""
    start = time.perf_counter()
    urls = check.urls
    if expected is not None:
        report.checksum = _check_checksum(http, urls, expected[0], expected[1], check.retry, adapter=adapter)
        report.verified = True
    if check.probe is not None or labelled:
        diffs = []
        for url in urls:
            client = RolloutClient(
                [url],
                backend=check.backend,
                api_key=check.api_key,
                max_retries=2,
                transport=check.transport,
                return_weight_versions=url in labelled,
                adapter=adapter,
            )
            completion = _probe_completion(client, check.prompt, check.probe_tokens)
            if url in labelled and not _check_version(url, completion, version):
                labelled.remove(url)
            if check.probe is not None:
                diffs.append(_check_logprobs(url, completion, check.probe, check.prompt, check.tolerance))
        report.max_logprob_diff = max(diffs) if diffs else None
        every = set(labelled) == set(urls)
        report.weight_version = version if every else None
        report.verified = report.verified or check.probe is not None or every
    report.verify_seconds = time.perf_counter() - start
    if not report.verified:
        _warn(
            f"weights pushed to {', '.join(urls)} by {report.method} but not verified: pass probe= "
            "(the trainer's logprobs) so that stale weights are caught"
        )
    return report


def _warn(message: str) -> None:
    """Warn at the caller of ``sync_weights``: the first frame outside this module. A fixed
    ``stacklevel`` cannot, since the same check runs at different depths on the full-weights
    and the adapter path (``skip_file_prefixes`` does this from Python 3.12)."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _resolve_method(method: str, backend: str, can_restart: bool) -> str:
    if method == "auto":
        method = "reload" if backend == "vllm" else "disk"
    if method == "disk" and backend == "vllm":
        raise WeightSyncError(
            "vLLM has no update_weights_from_disk route; use sync=reload or restart"
        )
    if method == "reload" and backend != "vllm":
        raise WeightSyncError(f"sync=reload is vLLM's dev-mode route; {backend} uses sync=disk")
    if method == "restart" and not can_restart:
        raise WeightSyncError(
            "sync=restart needs a server we launched (a ManagedServer without urls)"
        )
    if method not in ("disk", "reload", "restart"):
        raise WeightSyncError(f"unknown sync method {method!r}")
    return method


def _restart(server: ManagedServer, model_dir: str, recover: bool) -> None:
    """``recover``: the server failed (it died, or refused the update), not a planned restart."""
    try:
        (server.recover if recover else server.restart)(model=model_dir)
    except ServerUnavailable as exc:
        raise WeightSyncError(f"restarting the server on {model_dir} failed: {exc}") from exc


def _send(http: httpx.Client, method: str, url: str, path: str, retry: RetryPolicy, payload: dict | None = None) -> httpx.Response:
    def give_up(last: BaseException, attempts: int) -> ServerUnavailable:
        return ServerUnavailable(
            f"{url}{path} got no answer after {attempts} attempt{'s' if attempts > 1 else ''}: "
            f"{type(last).__name__}: {last}"
        )

    try:  # no answer is retried; an HTTP error status is an answer
        return retry.call(lambda _: http.request(method, f"{url}{path}", json=payload), httpx.TransportError, give_up)
    except httpx.HTTPError as exc:
        raise WeightSyncError(f"{url}{path} failed: {type(exc).__name__}: {exc}") from None


def _update_from_disk(http: httpx.Client, url: str, model_dir: str, retry: RetryPolicy, version: str | None) -> bool:
    """SGLang (and the built-in server): returns True when the update labelled the weights."""
    body = {"model_path": model_dir}
    if version is not None:
        body["weight_version"] = version
    r = _send(http, "POST", url, "/update_weights_from_disk", retry, body)
    answer = _json_object(r)
    if r.status_code != 200 or not answer.get("success"):
        message = answer.get("message") or r.text
        raise WeightSyncError(f"{url} could not load {model_dir}: HTTP {r.status_code} {message}")
    return version is not None


def _vllm_reload(http: httpx.Client, url: str, model_dir: str, retry: RetryPolicy, version: str | None) -> bool:
    """Returns True when the server took the version label (vLLM with ``/update_weight_version``)."""
    r = _send(
        http,
        "POST",
        url,
        "/collective_rpc",
        retry,
        {"method": "reload_weights", "kwargs": {"weights_path": model_dir}},
    )
    if r.status_code == 404:
        raise WeightSyncError(
            f"{url} has no /collective_rpc route: start vLLM with VLLM_SERVER_DEV_MODE=1"
        )
    if r.status_code != 200:
        # Older vLLM: reload_weights() takes no path and reads model_config.model.
        steps = [
            {"method": "update_config", "args": [{"model_config": {"model": model_dir}}]},
            {"method": "reload_weights"},
        ]
        for step in steps:
            r = _send(http, "POST", url, "/collective_rpc", retry, step)
            if r.status_code != 200:
                raise WeightSyncError(
                    f"{url} /collective_rpc {step['method']} failed: HTTP {r.status_code} {r.text[:300]}"
                )
    _reset_prefix_cache(http, url, retry)
    return version is not None and _label_version(http, url, version, retry)


def _label_version(http: httpx.Client, url: str, version: str, retry: RetryPolicy) -> bool:
    """``POST /update_weight_version`` (vLLM; SGLang, whose request model also has
    ``abort_all_requests``, left to its default: syncs run with no request in flight). Returns
    False for a server without the route (older vLLM), which only the probe can check."""
    r = _send(http, "POST", url, "/update_weight_version", retry, {"new_version": version})
    if r.status_code == 404:
        return False
    if r.status_code != 200:
        raise WeightSyncError(f"{url} /update_weight_version failed: HTTP {r.status_code} {r.text[:300]}")
    return True


def _reset_prefix_cache(http: httpx.Client, url: str, retry: RetryPolicy) -> None:
    # vLLM answers 200 {"success": false} while blocks are still held (a request still running,
    # a KV offload in flight); the old weights' KV would then be reused. One more try after a
    # pause, then the sync fails (and a server of ours is restarted instead).
    for attempt in range(2):
        r = _send(http, "POST", url, "/reset_prefix_cache", retry)
        if r.status_code != 200:
            raise WeightSyncError(
                f"{url} /reset_prefix_cache failed: HTTP {r.status_code} {r.text[:300]}"
            )
        if _json_object(r).get("success", True) is not False:  # older vLLM answer with no body
            return
        if attempt == 0:
            time.sleep(max(retry.backoff, 0.5))
    raise WeightSyncError(
        f"{url} /reset_prefix_cache answered success=false twice: KV cached with the old weights "
        "could still be reused"
    )


def _json_object(r: httpx.Response) -> dict:
    try:
        answer = r.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _check_checksum(
    http: httpx.Client,
    urls: list[str],
    what: str,
    expected_for: Callable[[str], str],
    retry: RetryPolicy,
    adapter: str | None = None,
) -> str:
    """The checksum every built-in server reports for its served weights, which must be
    ``expected_for(dtype)`` (the checksum of ``what`` in the server's dtype); with ``adapter``
    the server must also serve that LoRA adapter."""
    expected: dict[str, str] = {}
    served = ""
    for url in urls:
        try:
            info = _send(http, "GET", url, "/get_model_info", retry).json()
        except ValueError as exc:
            raise WeightSyncError(f"{url}/get_model_info failed: {exc}") from None
        dtype, served = info["dtype"], info["checksum"]
        if adapter is not None and info.get("lora_adapter") != adapter:
            raise WeightSyncError(f"{url} serves the adapter {info.get('lora_adapter')!r}, not {adapter!r} ({what})")
        if dtype not in expected:
            expected[dtype] = expected_for(dtype)
        if served != expected[dtype]:
            raise WeightSyncError(f"{url} serves weights with checksum {served}, but {what} has {expected[dtype]}")
    return served


def _probe_completion(client: RolloutClient, prompt: list[int], tokens: int) -> Completion:
    # Temperature 1, no top-k/top-p: every backend then reports the model's raw logprobs.
    request = GenerationRequest(
        prompt_ids=list(prompt), n=1, seed=0, params=SamplingParams(max_tokens=tokens)
    )
    try:
        return client.generate([request])[0][0]
    except ServerUnavailable:
        raise  # a lost server, not weights shown to be wrong
    except RuntimeError as exc:
        raise WeightSyncError(f"probe generation failed: {exc}") from None


def _check_version(url: str, completion: Completion, version: str) -> bool:
    """True when the completion shows ``version``; False when the server reports no version."""
    if not completion.weight_versions:
        _warn(
            f"{url} took weight version {version!r} but reports no version with its completions; "
            "only the logprob probe can check it"
        )
        return False
    if set(completion.weight_versions) != {version}:
        raise WeightSyncError(
            f"{url} does not serve the new weights: its completion was sampled by weight version "
            f"{', '.join(map(repr, completion.weight_versions))}, not {version!r}"
        )
    return True


def _check_logprobs(
    url: str, completion: Completion, probe: Probe, prompt: list[int], tolerance: float
) -> float:
    local = probe(list(prompt), completion.token_ids)
    if len(local) != len(completion.logprobs):
        raise WeightSyncError(
            f"probe returned {len(local)} logprobs for {len(completion.logprobs)} tokens"
        )
    diff = max(abs(a - b) for a, b in zip(local, completion.logprobs, strict=True))
    if diff > tolerance:
        raise WeightSyncError(
            f"{url} does not serve the trainer's weights: logprobs differ by up to "
            f"{diff:.3g} (tolerance {tolerance:g})"
        )
    return diff


# ---------------------------------------------------------------------- LoRA adapters
# Routes and bodies, read from each server's source:
#   vLLM: vllm/entrypoints/serve/lora/api_router.py, request models in
#     vllm/entrypoints/serve/lora/protocol.py: LoadLoRAAdapterRequest(lora_name, lora_path),
#     UnloadLoRAAdapterRequest(lora_name, lora_int_id=None); answers 200 with a text body, or an
#     ErrorResponse (400 "...has already been loaded" for a name that is loaded).
#   SGLang: python/sglang/srt/entrypoints/http_server.py, request models in
#     python/sglang/srt/managers/io_struct.py: LoadLoRAAdapterReqInput(lora_name, lora_path,
#     pinned=False, lora_id=None), UnloadLoRAAdapterReqInput(lora_name, lora_id=None); answers
#     LoRAUpdateOutput(success, error_message, loaded_adapters), 400 when not successful.
#   built-in: vLLM's routes and bodies (inference/server.py).
ADAPTER_ROUTES = {
    "builtin": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
    "vllm": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
    "sglang": ("/load_lora_adapter", "/unload_lora_adapter"),
}


def adapter_request(name: str, folder: str) -> dict:
    """The load body: the same two fields in vLLM's and SGLang's request models."""
    return {"lora_name": name, "lora_path": folder}


def _is_adapter(folder: str) -> bool:
    from ..lora import is_adapter_folder

    return is_adapter_folder(folder)


def _load_one(http: httpx.Client, url: str, backend: str, name: str, folder: str, retry: RetryPolicy) -> None:
    r = _send(http, "POST", url, ADAPTER_ROUTES[backend][0], retry, adapter_request(name, folder))
    try:
        answer = r.json()
    except ValueError:
        answer = {}
    answer = answer if isinstance(answer, dict) else {}
    if r.status_code == 200 and answer.get("success", True):
        return
    message = answer.get("error_message") or answer.get("message") or (answer.get("error") or {}).get("message") or r.text
    if r.status_code == 400 and "already" in str(message):
        return  # names derive from the weights: a loaded name holds these very weights
    raise WeightSyncError(f"{url} refused the LoRA adapter {folder}: HTTP {r.status_code} {' '.join(str(message).split())[:300]}")


def _unload_one(http: httpx.Client, url: str, backend: str, name: str, retry: RetryPolicy) -> None:
    r = _send(http, "POST", url, ADAPTER_ROUTES[backend][1], retry, {"lora_name": name})
    if r.status_code not in (200, 404):  # 404: gone already (e.g. the server restarted)
        _warn(f"{url} did not unload the old LoRA adapter {name}: HTTP {r.status_code} {r.text[:200]}")


def load_adapter(server: ManagedServer, folder: str, name: str) -> None:
    """Load the adapter in ``folder`` as ``name`` on every server (no verification)."""
    cfg = server.config
    retry = RetryPolicy.from_config(cfg)
    with httpx.Client(timeout=cfg.request_timeout, headers=auth_headers(cfg.api_key), verify=ssl_context()) as http:
        for url in server.urls:
            _load_one(http, url, cfg.backend, name, folder, retry)


# A restarted server gets the policy's adapter again through this (launch.py knows no routes).
ManagedServer.adapter_loader = load_adapter


def _sync_adapter(managed: ManagedServer | None, check: _Check, folder: str, timeout: float, version: str | None) -> SyncReport:
    """Serve the LoRA adapter in ``folder`` (``sync_weights`` of an adapter folder), verified by
    ``_verify`` as a full sync is: the built-in server's checksum of the adapter it applied, the
    weight version of servers that label one, the probe (which names the adapter)."""
    from ..lora import adapter_name

    name = adapter_name(folder)
    version = version or f"{name}-{uuid.uuid4().hex[:12]}"
    urls, backend, retry = check.urls, check.backend, check.retry
    previous = managed.adapter if managed is not None else None
    ours = managed is not None and managed.managed
    method = "adapter"
    labelled: list[str] = []
    start = time.perf_counter()
    with httpx.Client(timeout=timeout, headers=auth_headers(check.api_key), transport=check.transport, verify=ssl_context()) as http:
        if ours and managed.exit_code is not None:
            _warn(f"the server process exited (code {managed.exit_code}); restarting it")
            method = "restart"
        else:
            try:
                for url in urls:
                    _load_one(http, url, backend, name, folder, retry)
            except WeightSyncError as exc:
                if not ours:
                    raise
                _warn(f"{exc}; restarting the server instead")
                method = "restart"
        if managed is not None:
            managed.adapter = (name, folder)
        if method == "restart":
            _restart(managed, None, recover=True)  # on the base model; start() loads the adapter
        elif backend != "builtin":
            if previous is not None and previous[0] != name:
                # The built-in server holds one adapter, which the new one replaced.
                for url in urls:
                    _unload_one(http, url, backend, previous[0], retry)
            labelled = [url for url in urls if _label_version(http, url, version, retry)]
        report = SyncReport(seconds=time.perf_counter() - start, method=method, verified=False, adapter=name)
        expected = None
        if backend == "builtin":
            from ..lora import adapter_base, served_checksum
            from ..models import resolve_model_path

            base = resolve_model_path(adapter_base(folder))
            expected = (f"{base} with the adapter {folder}", lambda d: served_checksum(base, folder, d))
        return _verify(report, http, check, labelled, version, expected, adapter=name)
