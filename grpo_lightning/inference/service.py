"""RolloutService: the one owner of generation.

It owns the inference server (launched or attached, ``ManagedServer``) and its client, the
policy for a server that fails (restart a launched one, stop the run for an attached one), the
weight sync, evaluation requests and, with ``max_staleness >= 1``, the thread that generates
the next iterations' rollouts while the trainer trains. The data module asks it for an
iteration's scored rollouts (``rollouts``); the weight-sync and evaluation callbacks call
``sync`` and ``evaluate`` / ``submit_evaluation``. It lives on rank zero only.

Policy versions: version ``v`` is the policy after ``v`` iterations (the baseline is 0; a run
resumed at iteration ``s`` starts serving version ``s``). With ``max_staleness = k``:

* ``k = 0``: iteration ``j`` is generated when the trainer asks for it, on version ``j``.
* ``k >= 1``: a background thread generates iteration ``j`` on exactly version
  ``max(s, j - k)``: it waits until that version is served. The sync that pushes version ``v``
  waits until every generation that needs an older version has finished, and for the
  evaluations running on the version it replaces: no request is ever in flight during a sync,
  so every completion is sampled by exactly one set of weights and its version tag is exact
  (vLLM and SGLang would otherwise mix two policies inside one completion; aborting and
  resending would waste the work done). Evaluation after iteration ``i`` (on version ``i + 1``)
  runs beside the generation that uses the same version.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..envs import Environment
from ..metrics import all_equal, group_summary, zero_std_fraction
from ..rollouts import Rollout, RolloutGenerator, assign_advantages, sampling_seed
from .client import RetriesExhausted, RolloutClient, SamplingParams, ServerUnavailable
from .launch import ManagedServer
from .weight_sync import Probe, SyncReport, sync_weights


@dataclass(frozen=True)
class RolloutRecipe:
    """What an iteration's rollouts are: which problems, how many completions, how they are
    sampled and scored (the data module's settings, resolved)."""

    train_seeds: Sequence[int]
    """The accepted training problem seeds."""
    problems_per_iteration: int
    rollouts_per_problem: int
    seed: int
    """Base of every sampling seed."""
    sampling: SamplingParams
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    scale_rewards: str = "group"
    advantage_eps: float = 1e-4
    mask_truncated_completions: bool = False
    eval_seeds: Sequence[int] = ()
    eval_replicates: int = 4
    eval_temperature: float | None = None

    def iteration_seeds(self, iteration: int) -> list[int]:
        """The problems of ``iteration``: ``seeds[(iteration * P + j) % N]`` for ``j < P``."""
        p, n = self.problems_per_iteration, len(self.train_seeds)
        return [self.train_seeds[(iteration * p + j) % n] for j in range(p)]


@dataclass
class IterationRecord:
    """What one iteration produced, for the callbacks that report it: filled in as the
    iteration goes (rollouts and their statistics, the weight sync, the evaluation)."""

    iteration: int
    rollouts: list[Rollout] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    sync: dict[str, Any] = field(default_factory=dict)
    """The sync after the iteration (``time/sync_s``, ``sync/method`` ...); rank zero only."""
    synced: tuple[Path, int] | None = None
    """The folder pushed after the iteration and the optimizer step its weights are from."""
    eval: dict[str, float] | None = None
    """The evaluation after the iteration, once it has finished (rank zero only)."""


class RolloutService:
    """Generation, weight sync and evaluation through one inference server (see the module doc)."""

    def __init__(
        self,
        server: ManagedServer,
        tokenizer: Any,
        env_factory: Callable[[], Environment],
        recipe: RolloutRecipe,
        max_staleness: int = 0,
    ) -> None:
        self.server = server
        self.tokenizer = tokenizer
        self.env_factory = env_factory
        self.recipe = recipe
        self.max_staleness = max_staleness
        self.client: RolloutClient | None = None
        self.version = 0
        """The policy version the server serves (weights after that many iterations)."""
        self._cond = threading.Condition()
        self._restart_lock = threading.Lock()
        self._closing = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._start = 0
        self._end: int | None = None
        self._ready: dict[int, tuple[list[Rollout], dict[str, Any]]] = {}
        self._generated = -1  # the last iteration the thread has finished
        self._evals: list[Future] = []
        self._eval_pool: ThreadPoolExecutor | None = None
        self._active = 0  # generation, evaluation and sync calls in flight on the server
        self._idle = 0.0
        self._idle_since = time.perf_counter()
        self._idle_reported = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> RolloutService:
        """Launch (or attach to) the server and wait until it generates."""
        self.server.start()
        self.client = self.server.client(tokenizer=self.tokenizer)
        return self

    def stop(self) -> None:
        """Stop the generation thread and evaluations, then a launched server."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._eval_pool is not None:
            self._eval_pool.shutdown(wait=False, cancel_futures=True)
        thread, self._thread = self._thread, None
        # A restart in progress on the generation thread finishes first: stopping the server
        # under it would leave the process it launches next running.
        restarting = not self._restart_lock.acquire(timeout=self.server.config.stop_timeout)
        try:
            self.server.stop()  # a request in flight fails at once instead of running to its end
        finally:
            if not restarting:
                self._restart_lock.release()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.server.config.stop_timeout)

    @property
    def restarts(self) -> int:
        """Restarts of a launched server after a crash, a hang or a failed update."""
        return self.server.recoveries

    @property
    def pid(self) -> int | None:
        return self.server.pid

    @property
    def attached(self) -> bool:
        return not self.server.managed

    def lost(self, during: str, exc: Exception) -> ServerUnavailable:
        """The one-line stop of a run whose attached server stayed away longer than the retry budget."""
        cfg = self.server.config
        return ServerUnavailable(
            f"lost the inference server {', '.join(self.server.urls)} during {during} for longer than the "
            f"retry budget (data.server.max_retries={cfg.max_retries}, backoff={cfg.backoff:g}s): {exc}; "
            "the last completed iteration is in checkpoints/last.ckpt: resume with --ckpt_path last "
            "once the server answers again"
        )

    # ------------------------------------------------------------------ generation

    def generator(self, temperature: float | None = None) -> RolloutGenerator:
        if self.client is None:
            raise RuntimeError("the rollout service is not started (call start first)")
        if self.server.adapter is not None:
            self.client.adapter = self.server.adapter[0]  # the policy's newest LoRA adapter
        params = self.recipe.sampling
        if temperature is not None:
            params = dataclasses.replace(params, temperature=temperature)
        return RolloutGenerator(self.client, self.tokenizer, self.env_factory, params)

    def generate(self, gen: RolloutGenerator, seeds: list[int], n: int, seed_tag: str, description: str) -> list[list[Rollout]]:
        """``gen.generate`` that survives a launched server crashing or hanging: once the client's
        retry budget is spent, the server is restarted on the weights it served (the newest
        pushed) and the round's requests are sent again (same sampling seeds, so the same
        rollouts). An attached server lost for longer than the retry budget stops the run with
        ``ServerUnavailable``. Safe to call from two threads (generation and evaluation): a
        failure both see restarts the server once."""
        cfg = self.server.config
        live = threading.current_thread() is threading.main_thread()
        failures = 0
        while True:
            restarts_before = self.server.recoveries
            try:
                with self._busy(), _progress(description, len(seeds), live) as advance:
                    return gen.generate(seeds, n, seed_tag=seed_tag, on_done=advance)
            except RetriesExhausted as exc:
                if self._closing:
                    raise
                if not self.server.managed:
                    raise self.lost(description, exc) from exc
                failures += 1
                if failures > cfg.max_restarts:
                    raise ServerUnavailable(
                        f"the inference server at {self.server.urls[0]} kept failing after {failures - 1} restarts "
                        f"(data.server.max_restarts={cfg.max_restarts}): {exc}"
                    ) from exc
                with self._restart_lock:
                    if self._closing:
                        raise
                    if self.server.recoveries != restarts_before:
                        continue  # the other thread restarted it meanwhile: just send again
                    weights = self.server.served_weights or self.server.model
                    rank_zero_warn(f"{description}: the inference server failed ({exc}); restarting it on {weights}")
                    seconds = self.server.recover()
                rank_zero_info(f"inference server restarted on {weights} in {seconds:.1f}s; sending the requests again")

    def iteration(self, iteration: int, version: int | None = None) -> tuple[list[list[Rollout]], dict[str, Any]]:
        """Generate, score and (optionally) filter the groups of one iteration on the weights the
        server serves now (``version``, default ``iteration``: the weights after that many
        iterations), and their statistics."""
        rc = self.recipe
        version = iteration if version is None else version
        gen = self.generator()
        g = rc.rollouts_per_problem
        seeds = rc.iteration_seeds(iteration)
        t0 = time.perf_counter()
        groups = self.generate(gen, seeds, g, f"{rc.seed}:train:{iteration}", f"iteration {iteration}: generating")
        all_groups = list(groups)
        rounds = 0
        if rc.dynamic_sampling:
            kept = [grp for grp in groups if not all_equal([r.reward for r in grp])]
            used = set(seeds)
            while len(kept) < len(seeds) and rounds < rc.dynamic_sampling_max_rounds:
                rounds += 1
                pool = [s for s in rc.train_seeds if s not in used]
                if not pool:
                    break
                rng = random.Random(sampling_seed(rc.seed, "dynamic", iteration, rounds))
                extra = rng.sample(pool, min(len(pool), len(seeds) - len(kept)))
                used.update(extra)
                new = self.generate(
                    gen, extra, g, f"{rc.seed}:train:{iteration}:{rounds}", f"iteration {iteration}: refilling (round {rounds})"
                )
                all_groups += new
                kept += [grp for grp in new if not all_equal([r.reward for r in grp])]
            groups = kept[: len(seeds)]
            if not groups:
                # An empty iteration would make Lightning stop the whole fit ("No training
                # batches") with exit code 0 and no metrics: keep the loop going instead.
                rank_zero_warn(
                    f"iteration {iteration}: no group had different rewards after {rounds} refill rounds "
                    f"(data.dynamic_sampling_max_rounds={rc.dynamic_sampling_max_rounds}); training on "
                    "the iteration's own groups, whose advantages are all 0"
                )
                groups = all_groups[: len(seeds)]
        gen_seconds = time.perf_counter() - t0
        assign_advantages(groups, rc.scale_rewards, rc.advantage_eps, rc.mask_truncated_completions)
        flat = [r for grp in all_groups for r in grp]
        for r in flat:
            r.policy_version = version
        rewards = [[r.reward for r in grp] for grp in all_groups]
        successes = [[r.success for r in grp] for grp in all_groups]
        comp_names = list(flat[0].components) if flat else []
        trained = [r for grp in groups for r in grp]
        staleness = [iteration - r.policy_version for r in trained]
        stats: dict[str, Any] = {
            **{f"reward/{k}": v for k, v in group_summary(rewards, successes, ks=()).items()},
            **{f"reward_component/{c}": sum(r.components[c] for r in flat) / max(1, len(flat)) for c in comp_names},
            "reward/nonfinite": len(gen.nonfinite_rewards),
            "rollout/frac_reward_zero_std": zero_std_fraction(rewards),
            "rollout/completion_tokens_mean": sum(len(r.completion_ids) for r in flat) / max(1, len(flat)),
            "rollout/completion_tokens_max": max((len(r.completion_ids) for r in flat), default=0),
            "rollout/prompt_tokens_mean": sum(len(r.prompt_ids) for r in flat) / max(1, len(flat)),
            "rollout/truncated_fraction": sum(r.truncated for r in flat) / max(1, len(flat)),
            "rollout/tokens_generated": sum(len(r.completion_ids) for r in flat),
            "rollout/groups_trained": len(groups),
            "rollout/dynamic_sampling_rounds": rounds,
            "rollout/policy_version": version,
            "rollout/staleness_mean": sum(staleness) / max(1, len(staleness)),
            "rollout/staleness_max": max(staleness, default=0),
            "problem_seeds": [grp[0].problem_seed for grp in groups],
            "time/generate_s": gen_seconds - gen.score_seconds,
            "time/score_s": gen.score_seconds,
        }
        return groups, stats

    def rollouts(self, iteration: int, end: int | None = None) -> tuple[list[Rollout], dict[str, Any]]:
        """The scored rollouts of ``iteration`` and their statistics, for the trainer.

        ``max_staleness = 0``: generated now, on the weights served now. Otherwise the first
        call starts the thread that generates ahead (from ``iteration`` up to ``end``, exclusive;
        None: no end), and each call waits for its iteration. A failure of the thread is raised
        here (and by ``sync``), as the run's error.
        """
        t0 = time.perf_counter()
        if self.max_staleness == 0:
            groups, stats = self.iteration(iteration)
            rollouts = [r for grp in groups for r in grp]
        else:
            if self._thread is None:
                self._run_ahead(iteration, end)
            with self._cond:
                self._wait(lambda: iteration in self._ready, f"the rollouts of iteration {iteration}")
                rollouts, stats = self._ready.pop(iteration)
        stats = {**stats, "time/wait_rollouts_s": time.perf_counter() - t0, "time/server_idle_s": self._idle_since_last(),
                 "server/restarts": self.restarts}
        return rollouts, stats

    def policy_version(self, iteration: int) -> int:
        """The version iteration ``iteration``'s rollouts are generated on."""
        return max(self._start, iteration - self.max_staleness)

    def _run_ahead(self, start: int, end: int | None) -> None:
        self._start, self._end, self.version = start, end, start
        self._generated = start - 1
        self._thread = threading.Thread(target=self._generate_ahead, name="rollouts-ahead", daemon=True)
        self._thread.start()

    def _generate_ahead(self) -> None:
        j = self._start
        try:
            while self._end is None or j < self._end:
                need = self.policy_version(j)
                with self._cond:
                    self._cond.wait_for(lambda n=need: self._closing or self.version >= n)
                    if self._closing:
                        return
                groups, stats = self.iteration(j, version=self.version)
                with self._cond:
                    self._ready[j] = ([r for grp in groups for r in grp], stats)
                    self._generated = j
                    self._cond.notify_all()
                j += 1
        except BaseException as exc:  # handed to the trainer's thread, which raises it
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        """Wait (holding ``_cond``) until ``condition``; raise the generation thread's failure."""
        self._cond.wait_for(lambda: condition() or self._error is not None or self._closing)
        if self._error is not None:
            raise self._error
        if self._closing:
            raise RuntimeError(f"the rollout service stopped while waiting for {what}")

    # ------------------------------------------------------------------ weights

    def drain(self, version: int | None) -> None:
        """Wait until no generation or evaluation needs a policy older than ``version`` (None:
        only the evaluations). The trainer calls it before it overwrites the folder the server
        was last given: a launched server that fails until then is restarted on that folder,
        which must still hold the weights the remaining requests need. A failure of the
        generation thread or of an evaluation is raised here."""
        if self._thread is not None and version is not None:
            last = version + self.max_staleness - 1  # the last iteration generated on an older version
            if self._end is not None:
                last = min(last, self._end - 1)
            with self._cond:
                self._wait(lambda: self._generated >= last, f"the generations before the sync of version {version}")
        evals, self._evals = self._evals, []
        for future in evals:
            future.result()  # an evaluation's failure is the run's

    def sync(self, folder: Path, *, reason: str, version: int | None = None, probe: Probe | None = None) -> SyncReport:
        """Push the HF folder (full weights or a LoRA adapter) to the server and verify it.

        ``version``: the policy version the folder holds (None: a resume or attach sync, which
        does not change the numbering). Ahead of time (``max_staleness >= 1``) it first waits
        until no generation or evaluation needs the version being replaced (``drain``: call it
        before writing ``folder`` too). An attached server lost for longer than the retry
        budget stops the run (``ServerUnavailable``)."""
        self.drain(version)
        try:
            with self._busy():
                report = sync_weights(self.server, folder, probe=probe)
        except ServerUnavailable as exc:
            if self.server.managed:
                raise
            raise self.lost(f"the weight sync ({reason})", exc) from exc
        if version is not None:
            with self._cond:
                self.version = version
                self._cond.notify_all()
        return report

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> tuple[dict[str, float], list[Rollout]]:
        """Score the fixed eval set with the weights the server serves now."""
        rc = self.recipe
        gen = self.generator(rc.eval_temperature)
        t0 = time.perf_counter()
        groups = self.generate(gen, list(rc.eval_seeds), rc.eval_replicates, f"{rc.seed}:eval", "evaluating")
        ks = sorted({1, rc.eval_replicates} | ({k for k in (2, 4, 8, 16) if k < rc.eval_replicates}))
        metrics = group_summary([[r.reward for r in g] for g in groups], [[r.success for r in g] for g in groups], ks=ks)
        metrics["time/eval_s"] = time.perf_counter() - t0
        for r in (r for g in groups for r in g):
            r.policy_version = self.version
        return metrics, [r for g in groups for r in g]

    def submit_evaluation(self) -> Future:
        """``evaluate`` on the weights served now: at once (a finished future) with
        ``max_staleness = 0``; otherwise on a thread beside the generation that uses the same
        weights, and the next ``sync`` waits for it."""
        future: Future = Future()
        if self.max_staleness == 0:
            try:
                future.set_result(self.evaluate())
            except Exception as exc:
                future.set_exception(exc)
            return future
        if self._eval_pool is None:
            self._eval_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluation")
        future = self._eval_pool.submit(self.evaluate)
        self._evals.append(future)
        return future

    # ------------------------------------------------------------------ server idle time

    @contextmanager
    def _busy(self) -> Iterator[None]:
        with self._cond:
            if self._active == 0:
                self._idle += time.perf_counter() - self._idle_since
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._idle_since = time.perf_counter()

    def _idle_since_last(self) -> float:
        """Seconds the server had nothing to do since the previous call."""
        with self._cond:
            total = self._idle + (time.perf_counter() - self._idle_since if self._active == 0 else 0.0)
            seconds, self._idle_reported = total - self._idle_reported, total
        return seconds


class _progress:
    """A rich progress bar over requests (in the main thread; a background thread only logs)."""

    def __init__(self, description: str, total: int, live: bool = True) -> None:
        self.description, self.total, self.live = description, total, live
        self.bar: Progress | None = None
        self.t0 = 0.0

    def __enter__(self) -> Callable[[int], None]:
        self.t0 = time.perf_counter()
        if not self.live:
            return lambda _i: None
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        task = self.bar.add_task(self.description, total=self.total)
        self.bar.start()
        bar = self.bar
        return lambda _i: bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
        rank_zero_info(f"{self.description}: {self.total} prompts in {time.perf_counter() - self.t0:.1f}s")
