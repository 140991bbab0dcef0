"""RolloutDataModule: fresh rollouts from the inference server at every epoch (= GRPO iteration).

The data module owns the inference server (managed or attached), the rollout client and the
environment. ``train_dataloader`` is called once per epoch (``reload_dataloaders_every_n_epochs=1``):
it generates the iteration's rollouts with the weights the server serves now, scores them,
computes advantages and returns the iteration's micro-batches. ``evaluate`` scores the fixed
eval set for the evaluation callback.

A launched server that crashes or hangs during generation is restarted on the weights it served
and the round is sent again (``server/restarts`` counts it); an attached server lost for longer
than the retry budget, during generation or the weight sync, stops the run with
``ServerUnavailable`` (``checkpoints/last.ckpt`` holds the last completed iteration:
``--ckpt_path last`` resumes from there).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader

from .envs import Environment, make_env
from .inference.client import RetriesExhausted, RolloutClient, SamplingParams, ServerUnavailable
from .inference.launch import ManagedServer, ServerConfig, check_parallel
from .lora import LoraArgs
from .metrics import all_equal, group_summary, zero_std_fraction
from .models import load_tokenizer, stop_token_ids
from .rollouts import (
    MicroBatchDataset,
    Rollout,
    RolloutDataset,
    RolloutGenerator,
    assign_advantages,
    build_schedule,
    sampling_seed,
)


@dataclass
class EvalConfig:
    """The fixed evaluation set: the same problems and sampling seeds at every evaluation."""

    seed_start: int = 5000
    """First eval problem seed; eval problems are the first ``num_problems`` seeds from here that
    the environment accepts (same difficulty rule as training). Keep it outside the training range."""
    num_problems: int = 32
    """Problems in the eval set."""
    replicates: int = 4
    """Completions per eval problem (n of pass@k)."""
    interval: int = 1
    """Evaluate every ``interval`` iterations (and always after the last one); 0 is rejected."""
    temperature: float | None = None
    """Sampling temperature for evaluation; None uses the training temperature."""
    baseline: bool = True
    """Evaluate the initial weights before training starts (``metrics/eval_baseline.json``)."""
    num_samples_logged: int = 8
    """Completions written to TensorBoard's text tab at each evaluation."""


class RolloutDataModule(pl.LightningDataModule):
    def __init__(
        self,
        env: str = "sat",
        env_args: dict[str, Any] | None = None,
        problems_per_iteration: int = 8,
        rollouts_per_problem: int = 16,
        train_seed_start: int = 1000,
        num_train_seeds: int = 64,
        max_tokens: int = 512,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 50,
        scale_rewards: Literal["group", "batch", "none"] = "group",
        advantage_eps: float = 1e-4,
        dynamic_sampling: bool = False,
        dynamic_sampling_max_rounds: int = 3,
        mask_truncated_completions: bool = False,
        num_samples_logged: int = 8,
        eval: EvalConfig = EvalConfig(),
        server: ServerConfig = ServerConfig(),
        model_name_or_path: str = "tiny-sat",
        trust_remote_code: bool = False,
        num_iterations: int = 1,
        steps_per_iteration: int = 1,
        micro_batch_size: int = 4,
        max_tokens_per_micro_batch: int | None = None,
        share_prompts: bool = True,
        seed: int = 0,
        lora: LoraArgs = LoraArgs(),
    ) -> None:
        """
        Args:
            env: registered environment name (``grpo_lightning.envs.ENVIRONMENTS``).
            env_args: keyword options of the environment, e.g. ``{only_satisfiable: true,
                max_difficulty: 0.34}`` for SAT.
            problems_per_iteration: P, problems drawn per iteration. Iteration ``i`` uses training
                seeds ``seeds[(i * P + j) % num_train_seeds]`` for ``j < P`` (the reference's rule).
            rollouts_per_problem: G, completions per problem (the group of GRPO; at least 2).
            train_seed_start: first training problem seed.
            num_train_seeds: N, size of the training seed range (seeds the environment rejects
                are skipped, so the range holds N accepted seeds).
            max_tokens: maximum new tokens per completion.
            temperature: sampling temperature; the trainer's log-probabilities use the same one.
            top_p: nucleus sampling (Holtzman et al. 2020); 1.0 disables it.
            top_k: top-k sampling; 0 disables it.
            scale_rewards: advantage normalisation: ``group`` divides by the group's std (GRPO,
                Shao et al. 2024), ``batch`` by the batch std, ``none`` only centres (Dr. GRPO,
                Liu et al. 2025). Groups whose rewards are all equal get advantage exactly 0.
            advantage_eps: added to the std before dividing.
            dynamic_sampling: drop groups whose rewards are all equal and draw fresh problems
                to refill the batch (DAPO, Yu et al. 2025).
            dynamic_sampling_max_rounds: extra generation rounds at most; an iteration that
                still lacks informative groups trains on what it has (and if it has none, on
                its own all-equal groups, whose advantages are 0, with a warning).
            mask_truncated_completions: exclude completions cut at ``max_tokens`` from the loss
                (DAPO's overlong filtering).
            num_samples_logged: training completions (with problem seed, reward and success)
                written to TensorBoard's text tab each iteration.
            eval: the evaluation set (see ``EvalConfig``).
            server: the inference server, managed or attached (see ``ServerConfig``).
            model_name_or_path: linked from ``model.model_name_or_path``.
            trust_remote_code: linked from ``model.trust_remote_code``.
            num_iterations: linked from ``model.num_iterations``.
            steps_per_iteration: linked from ``model.steps_per_iteration``.
            micro_batch_size: linked from ``model.micro_batch_size``.
            max_tokens_per_micro_batch: linked from ``model.max_tokens_per_micro_batch``.
            share_prompts: linked from ``model.share_prompts``.
            seed: linked from ``seed_everything``: base of every sampling seed.
            lora: linked from ``model.lora``: a launched server is started to take adapters.
        """
        super().__init__()
        self.env_name = env
        self.env_args = dict(env_args or {})
        self.problems_per_iteration = problems_per_iteration
        self.rollouts_per_problem = rollouts_per_problem
        self.train_seed_start = train_seed_start
        self.num_train_seeds = num_train_seeds
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.scale_rewards = scale_rewards
        self.advantage_eps = advantage_eps
        self.dynamic_sampling = dynamic_sampling
        self.dynamic_sampling_max_rounds = dynamic_sampling_max_rounds
        self.mask_truncated_completions = mask_truncated_completions
        self.num_samples_logged = num_samples_logged
        self.eval_config = eval
        self.server_config = server
        self.model_name_or_path = model_name_or_path
        self.trust_remote_code = trust_remote_code
        self.num_iterations = num_iterations
        self.steps_per_iteration = steps_per_iteration
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.share_prompts = share_prompts
        self.seed = seed
        self.lora = LoraArgs(**lora) if isinstance(lora, dict) else lora
        self._validate()
        self.make_env()  # unknown environment names and options fail here, before any model loads

        self.server: ManagedServer | None = None
        self.client: RolloutClient | None = None
        self.tokenizer: Any = None
        self.stop_token_ids: list[int] = []
        self.train_seeds: list[int] = []
        self.eval_seeds: list[int] = []
        self.last_stats: dict[str, Any] = {}
        self.last_rollouts: list[Rollout] = []
        self.run_dir: Path | None = None

    def _validate(self) -> None:
        checks = {
            "problems_per_iteration": self.problems_per_iteration >= 1,
            "rollouts_per_problem": self.rollouts_per_problem >= 2,
            "num_train_seeds": self.num_train_seeds >= 1,
            "max_tokens": self.max_tokens >= 1,
            "temperature": 0 < self.temperature < math.inf,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "advantage_eps": self.advantage_eps >= 0,
            "dynamic_sampling_max_rounds": self.dynamic_sampling_max_rounds >= 0,
            "num_samples_logged": self.num_samples_logged >= 0,
            "eval.num_problems": self.eval_config.num_problems >= 0,
            "eval.replicates": self.eval_config.replicates >= 1,
            "eval.interval": self.eval_config.interval >= 1,
            "eval.temperature": self.eval_config.temperature is None or 0 < self.eval_config.temperature < math.inf,
            "eval.num_samples_logged": self.eval_config.num_samples_logged >= 0,
            **_server_checks(self.server_config),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"data.{k}={self._value(k)!r}" for k in bad)
            raise ValueError(f"invalid data config: {values} (see --print_config for the allowed values)")
        check_parallel(self.server_config)
        if self.lora.enabled and self.server_config.sync != "auto":
            raise ValueError(
                f"data.server.sync={self.server_config.sync!r} cannot send a LoRA adapter (model.lora.enabled=true): "
                "adapters go through each server's adapter-loading route; set data.server.sync auto"
            )
        if self.rollouts_per_problem * self.problems_per_iteration < self.steps_per_iteration:
            raise ValueError(
                f"data.problems_per_iteration * data.rollouts_per_problem "
                f"({self.problems_per_iteration * self.rollouts_per_problem}) must be at least "
                f"model.steps_per_iteration ({self.steps_per_iteration}): each optimizer step needs rollouts"
            )

    def _value(self, key: str) -> Any:
        if key.startswith("eval."):
            return getattr(self.eval_config, key[5:])
        if key.startswith("server."):
            return getattr(self.server_config, key[7:])
        return getattr(self, key)

    def make_env(self) -> Environment:
        return make_env(self.env_name, **self.env_args)

    # ------------------------------------------------------------------ lifecycle

    def setup(self, stage: str) -> None:
        if self.tokenizer is not None:
            return
        if self.trainer is not None:
            # Collective under DDP: every rank must ask (see callbacks.run_dir).
            self.run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        self.tokenizer = load_tokenizer(self.model_name_or_path, trust_remote_code=self.trust_remote_code)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model_name_or_path)
        env = self.make_env()
        self.train_seeds = _accepted_seeds(env, self.train_seed_start, self.num_train_seeds)
        self.eval_seeds = _accepted_seeds(env, self.eval_config.seed_start, self.eval_config.num_problems)
        overlap = set(self.train_seeds) & set(self.eval_seeds)
        if overlap:
            raise ValueError(
                f"data.eval.seed_start={self.eval_config.seed_start} puts {len(overlap)} eval problems inside "
                f"the training range (train seeds {self.train_seeds[0]}..{self.train_seeds[-1]}); move it"
            )
        if self.trainer is None or self.trainer.is_global_zero:
            self.start_server()

    def start_server(self) -> None:
        self.server = ManagedServer(
            self.server_config,
            self.model_name_or_path,
            # Outside a run (tests, scripts) ManagedServer picks a temporary file.
            log_path=self.run_dir / "server.log" if self.run_dir else None,
            trust_remote_code=self.trust_remote_code,
            lora=(self.lora.rank, list(self.lora.target_modules)) if self.lora.enabled else None,
        )
        self.server.start()
        self.client = self.server.client(tokenizer=self.tokenizer)

    def teardown(self, stage: str) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.client = None

    def on_exception(self, exception: BaseException) -> None:
        # Lightning skips ``teardown`` when fit fails; a launched server must not outlive the run.
        self.teardown("fit")

    # ------------------------------------------------------------------ rollouts

    def sampling_params(self, temperature: float | None = None) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_token_ids=self.stop_token_ids,
        )

    def generator(self, temperature: float | None = None) -> RolloutGenerator:
        if self.client is None:
            raise RuntimeError("the inference server is not running on this rank (call setup first)")
        if self.server is not None and self.server.adapter is not None:
            self.client.adapter = self.server.adapter[0]  # the policy's newest LoRA adapter
        return RolloutGenerator(self.client, self.tokenizer, self.make_env, self.sampling_params(temperature))

    def iteration_seeds(self, iteration: int) -> list[int]:
        """The reference's rule: ``seeds[(iteration * P + j) % N]``."""
        p, n = self.problems_per_iteration, len(self.train_seeds)
        return [self.train_seeds[(iteration * p + j) % n] for j in range(p)]

    def _generate(self, gen: RolloutGenerator, seeds: list[int], n: int, seed_tag: str, description: str) -> list[list[Rollout]]:
        """``gen.generate`` that survives a launched server crashing or hanging: once the client's
        retry budget is spent, the server is restarted on the weights it served and the round's
        requests are sent again (same sampling seeds, so the same rollouts). An attached server
        lost for longer than the retry budget stops the run with ``ServerUnavailable``."""
        server, cfg = self.server, self.server_config
        assert server is not None
        failures = 0
        while True:
            try:
                with _progress(description, len(seeds)) as advance:
                    return gen.generate(seeds, n, seed_tag=seed_tag, on_done=advance)
            except RetriesExhausted as exc:
                if not server.managed:
                    raise self.server_lost(description, exc) from exc
                failures += 1
                if failures > cfg.max_restarts:
                    raise ServerUnavailable(
                        f"the inference server at {server.urls[0]} kept failing after {failures - 1} restarts "
                        f"(data.server.max_restarts={cfg.max_restarts}): {exc}"
                    ) from exc
                weights = server.served_weights or server.model
                rank_zero_warn(f"{description}: the inference server failed ({exc}); restarting it on {weights}")
                seconds = server.recover()
                rank_zero_info(f"inference server restarted on {weights} in {seconds:.1f}s; sending the requests again")

    def server_lost(self, during: str, exc: Exception) -> ServerUnavailable:
        """The one-line stop of a run whose attached server stayed away longer than the retry budget."""
        assert self.server is not None
        cfg = self.server_config
        return ServerUnavailable(
            f"lost the inference server {', '.join(self.server.urls)} during {during} for longer than the "
            f"retry budget (data.server.max_retries={cfg.max_retries}, backoff={cfg.backoff:g}s): {exc}; "
            "the last completed iteration is in checkpoints/last.ckpt: resume with --ckpt_path last "
            "once the server answers again"
        )

    def generate_iteration(self, iteration: int) -> tuple[list[list[Rollout]], dict[str, Any]]:
        """Generate, score and (optionally) filter the groups of one iteration."""
        gen = self.generator()
        g = self.rollouts_per_problem
        seeds = self.iteration_seeds(iteration)
        t0 = time.perf_counter()
        groups = self._generate(gen, seeds, g, f"{self.seed}:train:{iteration}", f"iteration {iteration}: generating")
        all_groups = list(groups)
        rounds = 0
        if self.dynamic_sampling:
            kept = [grp for grp in groups if not all_equal([r.reward for r in grp])]
            used = set(seeds)
            while len(kept) < len(seeds) and rounds < self.dynamic_sampling_max_rounds:
                rounds += 1
                pool = [s for s in self.train_seeds if s not in used]
                if not pool:
                    break
                rng = random.Random(sampling_seed(self.seed, "dynamic", iteration, rounds))
                extra = rng.sample(pool, min(len(pool), len(seeds) - len(kept)))
                used.update(extra)
                new = self._generate(
                    gen, extra, g, f"{self.seed}:train:{iteration}:{rounds}", f"iteration {iteration}: refilling (round {rounds})"
                )
                all_groups += new
                kept += [grp for grp in new if not all_equal([r.reward for r in grp])]
            groups = kept[: len(seeds)]
            if not groups:
                # An empty iteration would make Lightning stop the whole fit ("No training
                # batches") with exit code 0 and no metrics: keep the loop going instead.
                rank_zero_warn(
                    f"iteration {iteration}: no group had different rewards after {rounds} refill rounds "
                    f"(data.dynamic_sampling_max_rounds={self.dynamic_sampling_max_rounds}); training on "
                    "the iteration's own groups, whose advantages are all 0"
                )
                groups = all_groups[: len(seeds)]
        gen_seconds = time.perf_counter() - t0
        assign_advantages(groups, self.scale_rewards, self.advantage_eps, self.mask_truncated_completions)
        rewards = [[r.reward for r in grp] for grp in all_groups]
        successes = [[r.success for r in grp] for grp in all_groups]
        flat = [r for grp in all_groups for r in grp]
        comp_names = list(flat[0].components) if flat else []
        stats: dict[str, Any] = {
            **{f"reward/{k}": v for k, v in group_summary(rewards, successes, ks=()).items()},
            **{f"reward_component/{c}": sum(r.components[c] for r in flat) / max(1, len(flat)) for c in comp_names},
            "frac_reward_zero_std": zero_std_fraction(rewards),
            "reward/nonfinite": len(gen.nonfinite_rewards),
            "completion_tokens_mean": sum(len(r.completion_ids) for r in flat) / max(1, len(flat)),
            "completion_tokens_max": max((len(r.completion_ids) for r in flat), default=0),
            "prompt_tokens_mean": sum(len(r.prompt_ids) for r in flat) / max(1, len(flat)),
            "truncated_fraction": sum(r.truncated for r in flat) / max(1, len(flat)),
            "tokens_generated": sum(len(r.completion_ids) for r in flat),
            "groups_trained": len(groups),
            "dynamic_sampling_rounds": rounds,
            "problem_seeds": [grp[0].problem_seed for grp in groups],
            "time/generate_s": gen_seconds - gen.score_seconds,
            "time/score_s": gen.score_seconds,
        }
        return groups, stats

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        iteration = trainer.current_epoch if trainer is not None else 0
        if trainer is not None and trainer.max_epochs is not None and trainer.fit_loop.epoch_progress.current.processed >= trainer.max_epochs:
            # Resuming a finished run: Lightning asks for data before it sees there is nothing
            # left to do; an empty loader ends the fit instead of generating an iteration for nothing.
            empty = MicroBatchDataset(RolloutDataset([]), [], pad_id=0)
            return DataLoader(empty, batch_size=None, shuffle=False, num_workers=0)
        payload: Any = None
        distributed = trainer is not None and trainer.world_size > 1
        if trainer is None or trainer.is_global_zero:
            try:
                groups, stats = self.generate_iteration(iteration)
                payload = ([r for grp in groups for r in grp], stats)
            except Exception as exc:
                if not distributed:
                    raise
                payload = exc  # the other ranks wait in the broadcast: send them the failure
        if distributed:
            payload = trainer.strategy.broadcast(payload, src=0)
        if isinstance(payload, Exception):
            raise payload
        rollouts, stats = payload
        self.last_rollouts, self.last_stats = rollouts, stats
        dataset = RolloutDataset(rollouts)
        schedule = build_schedule(
            dataset,
            num_iterations=self.num_iterations,
            steps_per_iteration=self.steps_per_iteration,
            micro_batch_size=self.micro_batch_size,
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            seed=sampling_seed(self.seed, "schedule", iteration),
            share_prompts=self.share_prompts,
        )
        micro = MicroBatchDataset(dataset, schedule, pad_id=self.tokenizer.pad_token_id, share_prompts=self.share_prompts)
        return DataLoader(micro, batch_size=None, shuffle=False, num_workers=0)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> tuple[dict[str, float], list[Rollout]]:
        """Score the fixed eval set with the weights the server serves now (rank zero only)."""
        cfg = self.eval_config
        gen = self.generator(cfg.temperature)
        t0 = time.perf_counter()
        groups = self._generate(gen, self.eval_seeds, cfg.replicates, f"{self.seed}:eval", "evaluating")
        ks = sorted({1, cfg.replicates} | ({k for k in (2, 4, 8, 16) if k < cfg.replicates}))
        metrics = group_summary(
            [[r.reward for r in g] for g in groups], [[r.success for r in g] for g in groups], ks=ks
        )
        metrics["time/eval_s"] = time.perf_counter() - t0
        return metrics, [r for g in groups for r in g]


def _server_checks(c: ServerConfig) -> dict[str, bool]:
    return {
        "server.startup_timeout": 0 < c.startup_timeout < math.inf,
        "server.request_timeout": 0 < c.request_timeout < math.inf,
        "server.stop_timeout": 0 < c.stop_timeout < math.inf,
        "server.max_retries": c.max_retries >= 0,
        "server.backoff": 0 <= c.backoff < math.inf,
        "server.max_restarts": c.max_restarts >= 0,
        "server.max_concurrency": c.max_concurrency >= 1,
        "server.max_num_seqs": c.max_num_seqs >= 1,
        "server.port": c.port is None or 0 < c.port < 65536,
        "server.gpu_memory_utilization": 0 < c.gpu_memory_utilization <= 1,
        "server.verify_tolerance": c.verify_tolerance >= 0,
        "server.max_model_len": c.max_model_len is None or c.max_model_len >= 1,
    }


def _accepted_seeds(env: Environment, start: int, count: int, max_scan: int = 1_000_000) -> list[int]:
    seeds: list[int] = []
    s = start
    while len(seeds) < count:
        if s - start > max_scan:
            raise ValueError(f"the environment accepts fewer than {count} seeds in {start}..{s}: loosen env_args")
        if env.accepts(s):
            seeds.append(s)
        s += 1
    return seeds


class _progress:
    """A rich progress bar over requests; silent when nothing is waiting."""

    def __init__(self, description: str, total: int) -> None:
        self.description, self.total = description, total
        self.bar: Progress | None = None

    def __enter__(self):
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        task = self.bar.add_task(self.description, total=self.total)
        self.bar.start()
        bar = self.bar
        return lambda _i: bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        assert self.bar is not None
        self.bar.stop()
        rank_zero_info(f"{self.description}: {self.total} prompts in {self.bar.tasks[0].elapsed or 0:.1f}s")
