"""RolloutDataModule: fresh rollouts at every epoch (= GRPO iteration), from the rollout service.

``setup`` starts the ``RolloutService`` (the inference server, managed or attached, its client,
restarts, weight sync and evaluation requests; rank zero only). ``train_dataloader`` is called
once per epoch (``reload_dataloaders_every_n_epochs=1``): it asks the service for the
iteration's scored rollouts (with advantages), broadcasts them to the other ranks, keeps them in
the iteration's public ``record`` and returns the iteration's micro-batches.

With ``data.max_staleness = 0`` the rollouts are generated right there, with the weights the
server serves now; with ``k >= 1`` the service generates them ahead, on a policy at most ``k``
iterations old, while the trainer trains (see ``inference/service.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from .envs import Environment, make_env
from .inference.client import SamplingParams
from .inference.launch import ManagedServer, ServerConfig, check_parallel
from .inference.service import IterationRecord, RolloutRecipe, RolloutService
from .lora import LoraArgs
from .models import load_tokenizer, stop_token_ids
from .rollouts import MicroBatchDataset, RolloutDataset, build_schedule, sampling_seed


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
        max_staleness: int = 0,
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
            max_staleness: k, how many policy updates old a trained rollout may be. 0 (default):
                the synchronous loop: an iteration's rollouts are generated when the trainer asks
                for them, by the weights just trained, and the server idles while the trainer
                trains. k >= 1: the service generates the next iterations' rollouts in a
                background thread while the trainer trains; iteration ``j`` is sampled by exactly
                the policy after ``max(0, j - k)`` iterations (each ``Rollout.policy_version``
                says which; ``rollout/staleness_*`` logs it), and the weights go to the server as
                soon as an iteration's training ends. Rollouts in flight are never interrupted:
                a sync waits until no request needs the weights it replaces. The PPO ratio is
                then clipped against the trainer's own log-probabilities at the start of the
                iteration, with the staleness corrected by TIS (``model.tis_cap``, default 2
                when k >= 1). The same idea as TRL's ``AsyncGRPOTrainer``
                (``max_staleness``), verl's one-step off-policy mode (k = 1) and PipelineRL
                (Piche et al. 2025). Problem and sampling seeds stay a function of (seed,
                iteration), so a run is reproducible in what it samples; on resume the
                iterations generated ahead are regenerated on the restored weights.
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
        self.max_staleness = max_staleness
        self._validate()
        self.make_env()  # unknown environment names and options fail here, before any model loads

        self.service: RolloutService | None = None
        """The rollout service (rank zero, after ``setup``)."""
        self.tokenizer: Any = None
        self.stop_token_ids: list[int] = []
        self.train_seeds: list[int] = []
        self.eval_seeds: list[int] = []
        self._records: dict[int, IterationRecord] = {}
        self._loader: tuple[int, DataLoader] | None = None
        self.run_dir: Path | None = None

    def _validate(self) -> None:
        k = self.max_staleness
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(
                f"data.max_staleness={k!r} must be a whole number >= 0 (0: synchronous; k: rollouts "
                "at most k policy updates old)"
            )
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
            self.start_service()

    def start_service(self) -> None:
        server = ManagedServer(
            self.server_config,
            self.model_name_or_path,
            # Outside a run (tests, scripts) ManagedServer picks a temporary file.
            log_path=self.run_dir / "server.log" if self.run_dir else None,
            trust_remote_code=self.trust_remote_code,
            lora=(self.lora.rank, list(self.lora.target_modules)) if self.lora.enabled else None,
        )
        self.service = RolloutService(server, self.tokenizer, self.make_env, self.recipe, self.max_staleness)
        try:
            self.service.start()
        except BaseException:
            self.service = None
            raise

    def teardown(self, stage: str) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def on_exception(self, exception: BaseException) -> None:
        # Lightning skips ``teardown`` when fit fails; a launched server must not outlive the run.
        self.teardown("fit")

    # ------------------------------------------------------------------ rollouts

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_token_ids=self.stop_token_ids,
        )

    @property
    def recipe(self) -> RolloutRecipe:
        """What an iteration's rollouts are (available after ``setup``)."""
        return RolloutRecipe(
            train_seeds=self.train_seeds,
            problems_per_iteration=self.problems_per_iteration,
            rollouts_per_problem=self.rollouts_per_problem,
            seed=self.seed,
            sampling=self.sampling_params(),
            dynamic_sampling=self.dynamic_sampling,
            dynamic_sampling_max_rounds=self.dynamic_sampling_max_rounds,
            scale_rewards=self.scale_rewards,
            advantage_eps=self.advantage_eps,
            mask_truncated_completions=self.mask_truncated_completions,
            eval_seeds=self.eval_seeds,
            eval_replicates=self.eval_config.replicates,
            eval_temperature=self.eval_config.temperature,
        )

    def record(self, iteration: int) -> IterationRecord:
        """The public record of ``iteration`` (its rollouts and statistics once its dataloader
        is built; the callbacks add the sync and the evaluation)."""
        if iteration not in self._records:
            self._records = {k: v for k, v in self._records.items() if k >= iteration - 1}  # keep two
            self._records[iteration] = IterationRecord(iteration)
        return self._records[iteration]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Epochs processed, not ``current_epoch``: on a resume Lightning builds the first loader
        # before it updates ``current_epoch`` from the checkpoint, then builds it again.
        iteration = trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0
        if self._loader is not None and self._loader[0] == iteration:
            return self._loader[1]  # asked twice for one iteration: the same rollouts, generated once
        if trainer is not None and trainer.max_epochs is not None and iteration >= trainer.max_epochs:
            # Resuming a finished run: Lightning asks for data before it sees there is nothing
            # left to do; an empty loader ends the fit instead of generating an iteration for nothing.
            empty = MicroBatchDataset(RolloutDataset([]), [], pad_id=0)
            return DataLoader(empty, batch_size=None, shuffle=False, num_workers=0)
        payload: Any = None
        distributed = trainer is not None and trainer.world_size > 1
        if trainer is None or trainer.is_global_zero:
            assert self.service is not None
            end = trainer.max_epochs if trainer is not None and trainer.max_epochs not in (None, -1) else None
            try:
                payload = self.service.rollouts(iteration, end=end)
            except Exception as exc:
                if not distributed:
                    raise
                payload = exc  # the other ranks wait in the broadcast: send them the failure
        if distributed:
            payload = trainer.strategy.broadcast(payload, src=0)
        if isinstance(payload, Exception):
            raise payload
        record = self.record(iteration)
        record.rollouts, record.stats = payload
        dataset = RolloutDataset(record.rollouts)
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
        self._loader = (iteration, DataLoader(micro, batch_size=None, shuffle=False, num_workers=0))
        return self._loader[1]


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
