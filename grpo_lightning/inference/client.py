"""One rollout client for three servers: the built-in one, vLLM and SGLang.

Every completion comes back with the exact prompt and completion token ids the server used
(never re-tokenized text, so EOS and token boundaries survive), the behaviour logprobs of
the distribution it sampled from, the finish reason and the decoded text.

* ``builtin`` and ``vllm``: OpenAI ``POST /v1/completions`` through the ``openai`` SDK (one
  ``AsyncOpenAI`` per URL, its own retries off; imported at the first client, not when the CLI
  starts) with a token-id prompt, ``n``, ``seed`` and ``logprobs: 0``; the fields the SDK
  declares go as its arguments, the prompt and what the OpenAI API lacks (``return_token_ids``,
  ``top_k``, ...) in ``extra_body``, and the answer is read as JSON (``with_raw_response``):
  the token ids are fields beyond the OpenAI schema. Both
  servers sample choice ``i`` with ``seed + i``. For vLLM, launch with ``--logprobs-mode
  processed_logprobs`` so that logprobs are those after temperature/top-k/top-p
  (``launch.server_argv`` does).
* ``sglang``: native ``POST /generate`` (the SDK's plain ``post``) with a batch of ``n`` copies
  of ``input_ids``, each with its own ``sampling_params.sampling_seed = seed + i`` (SGLang's
  seeded sampler hashes seed and position, so one seed with ``n > 1`` would give ``n``
  identical samples; it also only honours seeds when launched with
  ``--enable-deterministic-inference``). Reads ``output_ids`` and
  ``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` triples); SGLang's
  logprobs are taken after temperature but before top-k/top-p.

Requests are spread round-robin over the URLs; a failed attempt (connection error, timeout,
HTTP 5xx/408/429) is retried on the next URL after an exponential backoff (``retry.RetryPolicy``,
the policy weight sync and health polling follow too). Once retries are spent,
``RetriesExhausted`` (a ``ServerUnavailable``) names the URLs and the last cause: a failed
request never turns into an empty completion, and the caller can tell a server that is down or
hung (restart it) from one that rejected the request (``GenerationError``: do not).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from .retry import RetryPolicy

if TYPE_CHECKING:
    # Imported by the first client instead (it costs every CLI process seconds at startup).
    import openai

BACKENDS = ("builtin", "vllm", "sglang")
RETRY_STATUS = {408, 429}


class ServerUnavailable(RuntimeError):
    """A server is down, hung or unreachable: it gave no answer, or no healthy one, within the
    retry budget or the startup deadline. The one type for that condition wherever it is met
    (starting a server, generating, syncing weights): restarting a server of ours may help,
    where it would not for a request the server rejected (``GenerationError``,
    ``weight_sync.WeightSyncError``)."""


class GenerationError(RuntimeError):
    """The server answered, but rejected the request or answered with something unusable: the
    request (or the server's setup) must change; a restart does not help."""


class RetriesExhausted(ServerUnavailable):
    """Every generation attempt failed in a way a healthy server would not (connection
    refused, timeout, 5xx/408/429): the server is down, hung or overloaded."""


@dataclass
class SamplingParams:
    """How to sample; the same meaning on every backend."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 keeps every token."""
    stop_token_ids: list[int] | None = None
    """Extra tokens that end a completion (EOS always does); included in ``token_ids``."""
    min_tokens: int = 0
    """Forbid EOS/stop tokens before this many tokens (benchmarks); leave 0 for training."""


@dataclass
class GenerationRequest:
    """``n`` completions of one prompt; completion ``i`` is sampled with ``seed + i``."""

    prompt_ids: list[int]
    n: int
    seed: int
    params: SamplingParams


@dataclass
class Completion:
    """One sampled completion, exactly as the server produced it."""

    prompt_ids: list[int]
    token_ids: list[int]
    """Generated tokens, the stop token (EOS) included when one ended the completion."""
    logprobs: list[float]
    """Behaviour logprob of each generated token."""
    finish_reason: str
    """``stop`` (EOS or a stop token) or ``length`` (``max_tokens`` reached)."""
    text: str
    """Decoded completion with special tokens removed."""
    weight_versions: list[str] = field(default_factory=list)
    """Labels of the weights that sampled the tokens, in order (several when the weights changed
    mid-completion), as SGLang and vLLM (with ``return_weight_versions``) report them; empty
    when the server reports none."""


class _Retryable(Exception):
    """An attempt failed in a way another attempt may not."""


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """The TLS context of every HTTP client we open, built once: httpx builds one for each new
    client, loading the CA bundle (~25 ms of CPU), and the trainer opens a client per
    generation round and per weight sync."""
    return httpx.create_ssl_context()


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header every server here (built-in, vLLM, SGLang) checks an API key in."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class RolloutClient:
    """Async client with bounded concurrency, timeouts, retries and several URLs.

    Args:
        urls: server base URLs (``http://host:port``); requests are spread over them.
        backend: ``builtin``, ``vllm`` or ``sglang``.
        model: model name for OpenAI-style backends; ``None`` asks ``/v1/models``.
        api_key: sent as ``Authorization: Bearer KEY``.
        max_concurrency: HTTP requests in flight at once, over all URLs.
        request_timeout: seconds allowed for one HTTP attempt.
        max_retries: extra attempts after the first failed one.
        backoff: seconds before the first retry; doubles each time up to ``max_backoff``.
        tokenizer: decodes ``token_ids`` when a server returns no text.
        transport: an ``httpx`` transport to use instead of the network (tests, proxies).
        max_backoff: the longest pause between two attempts.
        return_weight_versions: vLLM only: ask for the weight version that sampled each
            completion (SGLang always reports it).
        adapter: a LoRA adapter loaded on the servers to sample from instead of the base model:
            sent as ``model`` to OpenAI-style backends and as ``lora_path`` to SGLang (which
            takes the adapter's name there).
    """

    def __init__(
        self,
        urls: list[str],
        backend: str = "builtin",
        model: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 64,
        request_timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        tokenizer=None,
        transport: httpx.AsyncBaseTransport | httpx.BaseTransport | None = None,
        max_backoff: float = 30.0,
        return_weight_versions: bool = False,
        adapter: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("RolloutClient needs at least one server URL")
        import openai
        from openai.types.completion_create_params import CompletionCreateParamsBase

        self.urls = [u.rstrip("/") for u in urls]
        self.backend = backend
        self.model = model
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.request_timeout = request_timeout
        self.retry = RetryPolicy(max_retries, backoff, max_backoff)
        self.tokenizer = tokenizer
        self.transport = transport
        self.return_weight_versions = return_weight_versions and backend == "vllm"
        self.adapter = adapter
        self._models: dict[str, str] = {}
        self._next_url = itertools.count()
        # The SDK insists on a key: without one a placeholder is set and its header omitted
        # (per request: the SDK accepts the omission only there).
        self._sdk_headers = {} if api_key else {"Authorization": openai.Omit()}
        # ``completions.create``'s own arguments; the rest of a body goes through ``extra_body``.
        self._sdk_fields = frozenset(CompletionCreateParamsBase.__annotations__)

    @property
    def headers(self) -> dict[str, str]:
        return auth_headers(self.api_key)

    # ------------------------------------------------------------------ public API
    async def agenerate(
        self, requests: list[GenerationRequest], on_done: Callable[[int], None] | None = None
    ) -> list[list[Completion]]:
        """The ``n`` completions of each request, in request order.

        ``on_done(i)`` is called as soon as request ``i`` has all its completions.
        """
        sem = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        # One connection pool for every URL; the SDK accepts an httpx client (``transport``
        # stands in for the network in tests) and sets each request's timeout itself.
        async with httpx.AsyncClient(limits=limits, transport=self.transport, verify=ssl_context()) as http:
            servers = {url: self._sdk(url, http) for url in self.urls}
            tasks = [
                asyncio.ensure_future(self._request(servers, sem, i, r, on_done))
                for i, r in enumerate(requests)
            ]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def generate(
        self, requests: list[GenerationRequest], on_done: Callable[[int], None] | None = None
    ) -> list[list[Completion]]:
        """Blocking ``agenerate``; inside a running event loop it runs on a helper thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            running = False
        else:
            running = True
        if not running:
            return asyncio.run(self.agenerate(requests, on_done))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.agenerate(requests, on_done)).result()

    def health(self) -> None:
        """Raise ``ServerUnavailable`` (one line, naming the URL) unless every server is healthy."""
        timeout = min(self.request_timeout, 10.0)
        with httpx.Client(
            timeout=timeout, headers=self.headers, transport=self._sync_transport(), verify=ssl_context()
        ) as http:
            for url in self.urls:
                try:
                    r = http.get(f"{url}/health")
                except httpx.HTTPError as exc:
                    raise ServerUnavailable(
                        f"{self.backend} server at {url} is unreachable: {_one_line(exc)}"
                    ) from None
                if r.status_code != 200:
                    raise ServerUnavailable(
                        f"{self.backend} server at {url} is unhealthy: HTTP {r.status_code} {_one_line(r.text)}"
                    )

    # ------------------------------------------------------------------ one request with retries
    async def _request(
        self, servers: dict[str, openai.AsyncOpenAI], sem, index: int, req: GenerationRequest, on_done
    ) -> list[Completion]:
        if req.n < 1 or req.params.max_tokens < 1:
            raise GenerationError(f"request {index}: n and max_tokens must be >= 1")
        first = next(self._next_url)
        tried: list[str] = []

        async def attempt(number: int) -> list[Completion]:
            # Each retry goes to the next URL: a dead server is not asked twice in a row.
            url = self.urls[(first + number - 1) % len(self.urls)]
            tried.append(url)
            async with sem:
                return await self._call(servers[url], url, req)

        def give_up(last: BaseException, attempts: int) -> RetriesExhausted:
            return RetriesExhausted(
                f"request {index} failed after {attempts} attempts ({', '.join(sorted(set(tried)))}): {last}"
            )

        completions = await self.retry.acall(attempt, _Retryable, give_up)
        if on_done is not None:
            on_done(index)
        return completions

    def _sdk(self, url: str, http: httpx.AsyncClient) -> openai.AsyncOpenAI:
        import openai

        # max_retries=0: our retry policy (next URL, backoff, the budget) is the only one.
        return openai.AsyncOpenAI(
            base_url=f"{url}/v1",
            api_key=self.api_key or "unused",
            max_retries=0,
            timeout=self.request_timeout,
            http_client=http,
        )

    async def _call(self, sdk: openai.AsyncOpenAI, url: str, req: GenerationRequest) -> list[Completion]:
        import openai

        if self.backend == "sglang":
            payload = sglang_payload(req)
            if self.adapter is not None:
                # GenerateReqInput.lora_path (sglang/srt/managers/io_struct.py) names a loaded adapter.
                payload["lora_path"] = self.adapter
            # SGLang's native route, outside the OpenAI API: an absolute URL past base_url.
            body = await _answer(
                f"{url}/generate",
                self.request_timeout,
                sdk.post(f"{url}/generate", cast_to=object, body=payload, options={"headers": self._sdk_headers}),
            )
            return parse_sglang(body, req, self.tokenizer)
        model = self.adapter or self.model or await self._served_model(sdk, url)
        extra = openai_payload(req, model)
        if self.return_weight_versions:
            extra["return_weight_versions"] = True
        # The prompt's token ids travel in extra_body, which the SDK sends as it is: as the
        # declared ``prompt`` the SDK would convert them one at a time against its type
        # annotations (~20 us a token, most of a request's CPU time on the trainer's side).
        declared = {k: extra.pop(k) for k in list(extra) if k in self._sdk_fields and k != "prompt"}
        call = sdk.completions.with_raw_response.create(
            prompt=openai.Omit(), **declared, extra_body=extra, extra_headers=self._sdk_headers
        )
        where = f"{url}/v1/completions"
        # Read as JSON, not through the SDK's models: parse_openai takes what it needs (vLLM's
        # token_ids, prompt_token_ids and weight_versions are outside the OpenAI schema anyway).
        http_response = (await _answer(where, self.request_timeout, call)).http_response
        if "json" in http_response.headers.get("content-type", ""):
            try:
                answer = json.loads(http_response.content)
            except ValueError as exc:
                raise GenerationError(f"{where} answered with invalid JSON: {_one_line(exc)}") from None
        else:
            answer = http_response.text
        if not isinstance(answer, dict):  # text, or JSON that is not an object
            raise GenerationError(f"{where} answered with no completions object: {_one_line(answer)}")
        return parse_openai(answer, req, self.tokenizer)

    async def _served_model(self, sdk: openai.AsyncOpenAI, url: str) -> str:
        if url not in self._models:
            page = await _answer(f"{url}/v1/models", self.request_timeout, sdk.models.list(extra_headers=self._sdk_headers))
            try:
                self._models[url] = page.data[0].id
            except (AttributeError, IndexError, TypeError):
                raise GenerationError(f"{url}/v1/models: cannot read the served model name") from None
        return self._models[url]

    def _sync_transport(self):
        return self.transport if isinstance(self.transport, httpx.BaseTransport) else None


async def _answer(where: str, timeout: float, call: Awaitable):
    """``call``'s result, or its failure as ``_Retryable`` (no answer, 5xx/408/429: another
    attempt may succeed) or ``GenerationError`` (the server rejected the request)."""
    import openai

    try:
        return await call
    except openai.APITimeoutError:
        raise _Retryable(f"{where}: no answer within {timeout:g}s") from None
    except openai.APIConnectionError as exc:
        raise _Retryable(f"{where}: {_one_line(exc.__cause__ or exc)}") from None
    except openai.APIStatusError as exc:
        status, text = exc.status_code, _one_line(exc.response.text)
        if status >= 500 or status in RETRY_STATUS:
            raise _Retryable(f"{where}: HTTP {status} {text}") from None
        raise GenerationError(f"{where} rejected the request: HTTP {status} {text}") from None
    except (openai.OpenAIError, ValueError) as exc:  # an answer the SDK cannot read
        raise GenerationError(f"{where} answered with invalid JSON: {_one_line(exc)}") from None


# ---------------------------------------------------------------------- wire formats
def openai_payload(req: GenerationRequest, model: str | None) -> dict:
    """The ``/v1/completions`` body for the built-in server and vLLM."""
    p = req.params
    body = {
        "prompt": list(req.prompt_ids),
        "n": req.n,
        "seed": req.seed,
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k if p.top_k > 0 else -1,
        "logprobs": 0,
        "return_token_ids": True,
        "skip_special_tokens": True,
    }
    if model is not None:
        body["model"] = model
    if p.stop_token_ids:
        body["stop_token_ids"] = list(p.stop_token_ids)
    if p.min_tokens:
        body["min_tokens"] = p.min_tokens
    return body


def sglang_payload(req: GenerationRequest) -> dict:
    """The native ``/generate`` body: ``n`` copies of the prompt, seeds ``seed + i``."""
    p = req.params
    params = []
    for i in range(req.n):
        sp = {
            "max_new_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k if p.top_k > 0 else -1,
            "skip_special_tokens": True,
            "sampling_seed": req.seed + i,
        }
        if p.stop_token_ids:
            sp["stop_token_ids"] = list(p.stop_token_ids)
        if p.min_tokens:
            sp["min_new_tokens"] = p.min_tokens
        params.append(sp)
    return {
        "input_ids": [list(req.prompt_ids) for _ in range(req.n)],
        "sampling_params": params,
        "return_logprob": True,
    }


def parse_openai(body: dict, req: GenerationRequest, tokenizer=None) -> list[Completion]:
    """Completions from an OpenAI-style answer with ``return_token_ids`` and ``logprobs``."""
    try:
        choices = sorted(body["choices"], key=lambda c: c["index"])
        out = []
        for c in choices:
            if c.get("finish_reason") == "abort":  # vLLM aborted it (e.g. shutting down)
                raise _Retryable("the server aborted the request")
            prompt = c.get("prompt_token_ids") or body.get("prompt_token_ids")
            lp = c.get("logprobs") or {}
            completion = _completion(
                req,
                prompt,
                c["token_ids"],
                lp.get("token_logprobs"),
                c.get("finish_reason"),
                c.get("text"),
                tokenizer,
            )
            completion.weight_versions = [s["version"] for s in c.get("weight_versions") or []]
            out.append(completion)
    except (KeyError, TypeError, AttributeError) as exc:
        raise GenerationError(
            f"unexpected completions answer (missing {exc}); did the server get return_token_ids?"
        ) from None
    if len(out) != req.n:
        raise GenerationError(f"asked for {req.n} completions, the server returned {len(out)}")
    return out


def parse_sglang(body, req: GenerationRequest, tokenizer=None) -> list[Completion]:
    """Completions from SGLang's ``/generate`` answer to a batch request."""
    items = body if isinstance(body, list) else [body]
    if len(items) != req.n:
        raise GenerationError(f"asked for {req.n} completions, SGLang returned {len(items)}")
    out = []
    for item in items:
        try:
            meta = item["meta_info"]
            triples = meta["output_token_logprobs"]
            ids = item.get("output_ids")
            if ids is None:
                ids = [t[1] for t in triples]
            reason = meta["finish_reason"]
            reason = reason.get("type") if isinstance(reason, dict) else reason
        except (KeyError, TypeError, IndexError) as exc:
            raise GenerationError(
                f"unexpected SGLang answer (missing {exc}); was return_logprob sent?"
            ) from None
        if reason == "abort":
            raise _Retryable(
                f"SGLang aborted the request: {_one_line(str(meta.get('finish_reason')))}"
            )
        if [t[1] for t in triples] != list(ids):
            raise GenerationError("SGLang output_ids and output_token_logprobs disagree")
        completion = _completion(
            req, None, ids, [t[0] for t in triples], reason, item.get("text"), tokenizer
        )
        # Spans when the weights changed during the request; otherwise the one current label.
        spans = meta.get("weight_versions")
        if spans:
            completion.weight_versions = [s["version"] for s in spans]
        elif meta.get("weight_version") is not None:
            completion.weight_versions = [str(meta["weight_version"])]
        out.append(completion)
    return out


def _completion(req, prompt, ids, logprobs, reason, text, tokenizer) -> Completion:
    if prompt is not None and list(prompt) != list(req.prompt_ids):
        raise GenerationError("the server generated from different prompt tokens than were sent")
    if (
        logprobs is None
        or len(logprobs) != len(ids)
        or any(not isinstance(x, (int, float)) for x in logprobs)
    ):
        raise GenerationError("the server returned no logprob for some generated token")
    if len(ids) > req.params.max_tokens:
        raise GenerationError(
            f"the server returned {len(ids)} tokens for max_tokens={req.params.max_tokens}"
        )
    if text is None:
        if tokenizer is None:
            raise GenerationError(
                "the server returned no text; pass tokenizer= to decode token ids"
            )
        text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return Completion(
        prompt_ids=list(req.prompt_ids),
        token_ids=[int(t) for t in ids],
        logprobs=[float(x) for x in logprobs],
        finish_reason=str(reason),
        text=text,
    )


def _one_line(x: object, limit: int = 300) -> str:
    text = " ".join(str(x).split()) or type(x).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
