"""Batched generation with a KV cache, for the built-in server.

One background thread owns the model. Requests from the HTTP side queue up; at every decoding
step the thread admits waiting sequences into the running batch (continuous batching), so a
sequence never waits for a whole batch to finish. Layout of the running batch:

* the KV cache holds, per row, the prompt and every generated token but the last one, left
  padded to a common width; padding columns are zeros and masked out;
* each row feeds its last token at its own position id, so padding never shifts positions;
* newly admitted prompts are prefilled together (left-padded, at most ``max_prefill_tokens``
  per forward), once for all the ``n`` samples of a prompt, then copied into free rows of the
  batch (the cache is rebuilt only when a prompt is wider than the batch or no row is free);
* a finished row is overwritten by the last row; padding columns that no row needs any more
  are trimmed once they are a quarter of the width.

Each sequence samples with its own ``torch.Generator`` (``sampling.draw``), so its tokens do
not depend on what else shares the batch.

Weight swaps stop admitting new sequences, let the running ones finish on the old weights,
change the weights in place, then resume: a sequence never mixes two sets of weights.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..models import cache_kwarg
from .protocol import SamplingOptions
from .sampling import draw, make_generator, processed_logprobs

log = logging.getLogger(__name__)


@dataclass
class SequenceOutput:
    """One finished completion: tokens (stop token included), their logprobs, why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str
    stop_reason: int | None


@dataclass(eq=False)
class _Sequence:
    prompt: tuple[int, ...]
    options: SamplingOptions
    generator: torch.Generator
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: tuple[str, int | None] | None = None

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


class _GrowingLayer(DynamicLayer):
    """A KV cache layer of the running batch, with spare capacity in rows and columns.

    transformers' DynamicLayer concatenates the whole cache at every step, which on a
    64-row batch costs more than the model itself. Here the buffers are ``[row capacity,
    heads, column capacity, dim]``: appending a column writes in place (capacity doubles
    when full), a joining sequence is written into a free row and a finished one is replaced
    by the last row, so a step costs no copy of the cache. ``keys``/``values`` stay views of
    the filled part, so the model sees an ordinary dynamic cache.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self.rows = key_states.shape[0]
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, rows: int, length: int) -> _GrowingLayer:
        """A layer whose buffers are ``keys``/``values``, the first ``rows`` x ``length`` filled."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.buffers, layer.rows, layer.length = (keys, values), rows, length
        layer._refresh()
        return layer

    def _refresh(self) -> None:
        assert self.buffers is not None
        k, v = self.buffers
        self.keys, self.values = k[: self.rows, :, : self.length], v[: self.rows, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            self.buffers = (self._grown(0, key_states, end), self._grown(1, value_states, end))
        k, v = self.buffers
        k[: self.rows, :, self.length : end] = key_states
        v[: self.rows, :, self.length : end] = value_states
        self.length = end
        self._refresh()
        return self.keys, self.values

    def _grown(self, part: int, like: torch.Tensor, needed: int) -> torch.Tensor:
        shape = list(like.shape)
        if self.buffers is not None:
            shape[0] = self.buffers[part].shape[0]
        shape[-2] = max(2 * needed, 64)
        buf = like.new_zeros(shape)
        if self.buffers is not None:
            buf[: self.rows, :, : self.length] = self.buffers[part][: self.rows, :, : self.length]
        return buf

    @property
    def row_capacity(self) -> int:
        assert self.buffers is not None
        return self.buffers[0].shape[0]

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows (``[m, heads, w, dim]``, ``w <= length``) right-aligned at the current length."""
        assert self.buffers is not None
        m, w = keys.shape[0], keys.shape[2]
        rows = slice(self.rows, self.rows + m)
        for buf, t in zip(self.buffers, (keys, values), strict=True):
            buf[rows, :, : self.length - w] = 0  # a former row's values; masked, but never NaN
            buf[rows, :, self.length - w : self.length] = t
        self.rows += m
        self._refresh()

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor, rows: int) -> None:
        """Copy rows ``src`` over rows ``dst`` (disjoint), then keep the first ``rows``."""
        assert self.buffers is not None
        if dst.numel():
            for buf in self.buffers:
                filled = buf[:, :, : self.length]
                filled.index_copy_(0, dst, filled.index_select(0, src))
        self.rows = rows
        self._refresh()


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _assemble(blocks: list[list[tuple[torch.Tensor, torch.Tensor]]], width: int, row_capacity: int):
    """One cache holding row blocks (per layer ``[rows, heads, w, dim]``) left-padded to ``width``.

    Each block is copied once, straight into buffers with room to grow (``row_capacity`` rows);
    padding stays zero.
    """
    rows = sum(block[0][0].shape[0] for block in blocks)
    row_capacity = max(row_capacity, rows)
    layers = []
    for layer_idx in range(len(blocks[0])):
        buffers = []
        for part in (0, 1):
            first = blocks[0][layer_idx][part]
            buf = first.new_zeros(row_capacity, first.shape[1], max(2 * width, 64), first.shape[3])
            row = 0
            for block in blocks:
                t = block[layer_idx][part]
                buf[row : row + t.shape[0], :, width - t.shape[2] : width] = t
                row += t.shape[0]
            buffers.append(buf)
        layers.append(_GrowingLayer.holding(buffers[0], buffers[1], rows, width))
    cache = DynamicCache()
    cache.layers.extend(layers)
    return cache


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1)


class GenerationEngine:
    """Owns the model on one device and runs the decoding loop in a background thread."""

    def __init__(
        self,
        model,
        eos_token_ids: list[int],
        max_batch_size: int = 64,
        checksum: str = "",
        model_path: str = "",
        max_prefill_tokens: int = 8192,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.checksum = checksum
        self.model_path = model_path
        self.weights_version = 0
        self._cache_kw = cache_kwarg(model)
        self._logits_kw = (
            {"logits_to_keep": 1}
            if "logits_to_keep" in inspect.signature(model.forward).parameters
            else {}
        )
        self._cv = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._swap: (
            tuple[Callable[[torch.nn.Module], None], str, str, asyncio.Future, asyncio.AbstractEventLoop]
            | None
        ) = None
        self._closing = False
        self._rows: list[_Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)

    # ------------------------------------------------------------------ public, event-loop side
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) sequence counts."""
        return len(self._rows), len(self._waiting)

    async def generate(
        self, prompts: list[list[int]], options: SamplingOptions, seeds: list[int | None]
    ) -> list[SequenceOutput]:
        """One completion per (prompt, seed) pair, in order."""
        loop = asyncio.get_running_loop()
        seqs = [
            _Sequence(tuple(p), options, make_generator(s, self.device), loop.create_future(), loop)
            for p, s in zip(prompts, seeds, strict=True)
        ]
        with self._cv:
            if self._closing:
                raise RuntimeError("the generation engine is shut down")
            self._waiting.extend(seqs)
            self._cv.notify()
        # A cancelled await (client gone) cancels the futures; the loop then drops those rows.
        return list(await asyncio.gather(*(s.future for s in seqs)))

    @property
    def swap_pending(self) -> bool:
        """A weight swap waits for the running sequences to finish (new ones queue meanwhile)."""
        return self._swap is not None

    async def swap_weights(
        self, update: Callable[[torch.nn.Module], None], checksum: str, model_path: str
    ) -> None:
        """Once the running sequences have finished on the old weights, run ``update``, a
        function that changes the model's weights in place (copies a checkpoint's tensors in,
        or merges a LoRA adapter straight into them), under ``torch.no_grad``."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._cv:
            # Callers serialise updates (the server's update lock); a dead loop would never
            # settle ``done``, so refuse instead of hanging the request.
            if self._closing or not self._thread.is_alive():
                raise RuntimeError("the generation engine is shut down")
            self._swap = (update, checksum, model_path, done, loop)
            self._cv.notify()
        await done

    def check_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise ValueError unless ``tensors`` fit the served model (names, shapes) and
        replace all of its weights."""
        params = self.model.state_dict()
        unexpected = sorted(set(tensors) - set(params))
        if unexpected:
            raise ValueError(
                f"weights do not match the served model: unexpected tensors {unexpected[:5]}"
            )
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"weights do not match the served model: {name} has shape {tuple(t.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
        # Tied parameters (lm_head = embeddings) are stored once; anything else missing is an error.
        given = {params[name].data_ptr() for name in tensors}
        missing = sorted(n for n in set(params) - set(tensors) if params[n].data_ptr() not in given)
        if missing:
            raise ValueError(
                f"weights do not match the served model: missing tensors {missing[:5]}"
            )

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        finally:
            # However the loop ends, nobody may wait forever on a sequence it will not run.
            self._closing = True
            self._fail_all(RuntimeError("the generation engine is shut down"))

    def _iterate(self) -> bool:
        """One scheduling round: a weight swap, or admissions plus one decoding step."""
        with self._cv:
            while not (self._closing or self._waiting or self._rows or self._swap):
                self._cv.wait()
            if self._closing:
                return False
            swap_now = self._swap is not None and not self._rows
            admitted: list[_Sequence] = []
            # While a swap waits, admit nothing: the batch drains on the old weights.
            if self._swap is None:
                while self._waiting and len(self._rows) + len(admitted) < self.max_batch_size:
                    admitted.append(self._waiting.popleft())
        if swap_now:
            self._apply_swap()
            return True
        try:
            with torch.inference_mode():
                if admitted:
                    self._admit([s for s in admitted if not s.cancelled])
                if self._rows:
                    self._decode_step()
        except Exception as exc:  # a failed step must fail its requests, not the server
            log.exception("generation step failed")
            for seq in [*self._rows, *admitted]:
                self._resolve(seq, exc)
            self._rows, self._cache, self._mask = [], None, None
        return True

    def _fail_all(self, exc: Exception) -> None:
        with self._cv:
            pending = [*self._rows, *self._waiting]
            self._waiting.clear()
        for seq in pending:
            self._resolve(seq, exc)
        if self._swap is not None:
            _, _, _, fut, loop = self._swap
            loop.call_soon_threadsafe(_settle, fut, exc)

    def _apply_swap(self) -> None:
        assert self._swap is not None
        update, checksum, model_path, fut, loop = self._swap
        try:
            with torch.no_grad():
                update(self.model)
            self.checksum, self.model_path = checksum, model_path
            self.weights_version += 1
            result: object = None
        except Exception as exc:  # reported to the caller of swap_weights
            result = exc
        with self._cv:
            self._swap = None
        loop.call_soon_threadsafe(_settle, fut, result)

    def _resolve(self, seq: _Sequence, result: SequenceOutput | Exception) -> None:
        seq.loop.call_soon_threadsafe(_settle, seq.future, result)

    def _forward(self, input_ids, cache, **kwargs) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_kw: cache}, **kwargs)
        return out.logits[:, -1, :]

    def _admit(self, seqs: list[_Sequence]) -> None:
        groups: dict[tuple[int, ...], list[_Sequence]] = {}
        for seq in seqs:
            groups.setdefault(seq.prompt, []).append(seq)
        joining = []
        chunk: list[tuple[int, ...]] = []
        for prompt in sorted(groups, key=len):
            if chunk and (len(chunk) + 1) * len(prompt) > self.max_prefill_tokens:
                joining.append(self._prefill(chunk, groups))
                chunk = []
            chunk.append(prompt)
        if chunk:
            joining.append(self._prefill(chunk, groups))
        joining = [j for j in joining if j[0]]
        if joining:
            self._join(joining)

    def _prefill(
        self, prompts: list[tuple[int, ...]], groups: dict[tuple[int, ...], list[_Sequence]]
    ):
        """Prefill distinct prompts together (left-padded) and sample every sequence's first token.

        The ``n`` sequences of a prompt share its prefill. Returns the rows that continue,
        with their KV per layer and attention mask.
        """
        width = len(prompts[-1])
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(
            ids, cache, attention_mask=mask, position_ids=positions, **self._logits_kw
        )
        kv = _cache_tensors(cache)
        if not bool(mask.all()):
            # Padding is masked out later; zero it so that no stray NaN can leak through 0 * NaN.
            pad = (mask == 0)[:, None, :, None]
            kv = [(k.masked_fill(pad, 0), v.masked_fill(pad, 0)) for k, v in kv]
        seqs = [s for p in prompts for s in groups[p]]
        source = torch.tensor(
            [i for i, p in enumerate(prompts) for _ in groups[p]], device=self.device
        )
        self._sample(seqs, logits.index_select(0, source))
        for s in seqs:
            if s.finish is not None:
                self._finish(s)
        live = [i for i, s in enumerate(seqs) if s.finish is None]
        rows = source[live] if live else source[:0]
        kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv]
        return [seqs[i] for i in live], kv, mask.index_select(0, rows)

    def _join(self, groups) -> None:
        """Merge newly prefilled rows into the running batch: into its free rows when they fit
        (no copy of the running rows), else by rebuilding the cache once."""
        blocks = [kv for _, kv, _ in groups]
        masks = [mask for _, _, mask in groups]
        new_rows = [s for rows, _, _ in groups for s in rows]
        if self._rows:
            assert self._mask is not None
            layers = self._cache.layers
            width = self._mask.shape[1]
            fits = len(self._rows) + len(new_rows) <= layers[0].row_capacity and all(
                m.shape[1] <= width for m in masks
            )
            if fits:
                for block in blocks:
                    for layer, (k, v) in zip(layers, block, strict=True):
                        layer.add_rows(k, v)
                self._mask = torch.cat([self._mask, *(_left_pad(m, width) for m in masks)])
                self._rows = self._rows + new_rows
                return
            blocks.insert(0, _cache_tensors(self._cache))
            masks.insert(0, self._mask)
            new_rows = self._rows + new_rows
        width = max(m.shape[1] for m in masks)
        self._cache = _assemble(blocks, width, self._row_capacity(len(new_rows)))
        self._mask = torch.cat([_left_pad(m, width) for m in masks])
        self._rows = new_rows

    def _row_capacity(self, rows: int) -> int:
        return min(max(2 * rows, 16), self.max_batch_size)

    def _decode_step(self) -> None:
        assert self._mask is not None
        rows = self._rows
        ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)
        # Position of the fed token = real tokens already in the cache for that row.
        positions = torch.tensor(
            [[len(s.prompt) + len(s.tokens) - 1] for s in rows], device=self.device
        )
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(ids, self._cache, attention_mask=self._mask, position_ids=positions)
        self._sample(rows, logits)
        keep = [i for i, s in enumerate(rows) if s.finish is None and not s.cancelled]
        for s in rows:
            if s.finish is not None:
                self._finish(s)
        if len(keep) == len(rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        # The last rows fill the holes the finished ones leave: a copy of the moved rows only.
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [j for j in range(n, len(rows)) if j in kept]
        order = list(range(n))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        dst = torch.tensor(holes, dtype=torch.long, device=self.device)
        src = torch.tensor(movers, dtype=torch.long, device=self.device)
        for layer in self._cache.layers:
            layer.move_rows(dst, src, n)
        self._mask = self._mask.index_select(0, torch.tensor(order, device=self.device))
        self._rows = [rows[i] for i in order]
        # Columns that are padding for every remaining row are dead weight; trimming them
        # copies the cache, so wait until they are a quarter of it.
        first = int(self._mask.any(dim=0).nonzero()[0])
        if first * 4 >= self._mask.shape[1]:
            self._mask = self._mask[:, first:]
            trimmed = [(k[:, :, first:], v[:, :, first:]) for k, v in _cache_tensors(self._cache)]
            self._cache = _assemble([trimmed], self._mask.shape[1], self._cache.layers[0].row_capacity)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        opts = [s.options for s in seqs]
        dev = logits.device
        temperature = torch.tensor([o.temperature for o in opts], device=dev, dtype=torch.float32)
        top_k = torch.tensor([o.top_k for o in opts], device=dev)
        top_p = torch.tensor([o.top_p for o in opts], device=dev, dtype=torch.float32)
        banned = None
        if any(len(s.tokens) < s.options.min_tokens for s in seqs):
            banned = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
            for row, s in enumerate(seqs):
                if len(s.tokens) < s.options.min_tokens:
                    stops = self._stops(s.options)
                    banned[row, [t for t in stops if t < logits.shape[-1]]] = True
        logprobs = processed_logprobs(logits, temperature, top_k, top_p, banned)
        tokens = draw(logprobs, temperature <= 0, [s.generator for s in seqs])
        chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
        k = max(o.top_logprobs for o in opts)
        top = logprobs.topk(k, dim=-1) if k > 0 else None
        for row, (s, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            s.tokens.append(token)
            s.logprobs.append(chosen[row])
            if s.options.top_logprobs and top is not None:
                n = s.options.top_logprobs
                s.tops.append(
                    list(
                        zip(
                            top.indices[row, :n].tolist(), top.values[row, :n].tolist(), strict=True
                        )
                    )
                )
            if token in s.options.stop_token_ids:
                s.finish = ("stop", token)
            elif token in self.eos_token_ids and not s.options.ignore_eos:
                s.finish = ("stop", None)
            elif len(s.tokens) >= s.options.max_tokens:
                s.finish = ("length", None)

    def _stops(self, options: SamplingOptions) -> set[int]:
        return set(options.stop_token_ids) | (
            set() if options.ignore_eos else set(self.eos_token_ids)
        )

    def _finish(self, seq: _Sequence) -> None:
        assert seq.finish is not None
        reason, stop = seq.finish
        out = SequenceOutput(
            token_ids=seq.tokens,
            logprobs=seq.logprobs,
            top_logprobs=seq.tops if seq.options.top_logprobs else None,
            finish_reason=reason,
            stop_reason=stop,
        )
        self._resolve(seq, out)


def _settle(fut: asyncio.Future, result: object) -> None:
    if fut.done():  # cancelled by a client that went away
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
