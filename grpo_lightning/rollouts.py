"""Rollouts: prompts from seeds, completions from the server, rewards, advantages, the dataset.

The path of one iteration's data:
seeds -> ``env.reset`` -> prompt ids -> client -> completion ids + behaviour logprobs
-> ``env.step`` -> rewards -> group advantages -> ``RolloutDataset`` (map-style) ->
``MicroBatchDataset`` (the micro-batches of the iteration, in training order).
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .advantages import group_advantages
from .envs import Environment
from .inference.client import Completion, GenerationRequest, RolloutClient, SamplingParams
from .loss import Normalizer
from .packing import plan_micro_batches


def sampling_seed(*parts: object) -> int:
    """A 31-bit seed derived from ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class Rollout:
    """One completion of one problem, scored."""

    problem_seed: int
    replicate: int
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    finish_reason: str
    text: str
    reward: float
    components: dict[str, float]
    success: bool
    advantage: float = 0.0
    trainable: bool = True
    """False when the completion is masked out of the loss (truncated, with masking on)."""
    policy_version: int = 0
    """The policy that sampled it: the weights after this many iterations (``data.max_staleness``)."""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutGenerator:
    """Turns problem seeds into scored groups of completions through an inference server."""

    def __init__(
        self,
        client: RolloutClient,
        tokenizer: Any,
        env_factory: Callable[[], Environment],
        params: SamplingParams,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.env_factory = env_factory
        self.params = params
        self._prompts: dict[int, list[int]] = {}
        self.nonfinite_rewards: list[tuple[int, int]] = []
        """(problem seed, replicate) of completions whose reward was NaN or infinite."""
        self.score_seconds = 0.0
        """Time spent in the environment's reward (the rest of ``generate`` is the server)."""

    def prompt_ids(self, seed: int) -> list[int]:
        if seed not in self._prompts:
            messages = self.env_factory().reset(seed)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            self._prompts[seed] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompts[seed]

    def generate(
        self,
        seeds: Sequence[int],
        n: int,
        seed_tag: str,
        on_done: Callable[[int], None] | None = None,
    ) -> list[list[Rollout]]:
        """``n`` scored completions for each seed; sampling seeds derive from ``seed_tag``."""
        requests = [
            GenerationRequest(
                prompt_ids=self.prompt_ids(s), n=n, seed=sampling_seed(seed_tag, s), params=self.params
            )
            for s in seeds
        ]
        results = self.client.generate(requests, on_done=on_done)
        seen = len(self.nonfinite_rewards)
        t0 = time.perf_counter()
        groups = [self.score(seed, completions) for seed, completions in zip(seeds, results, strict=True)]
        self.score_seconds += time.perf_counter() - t0
        bad = self.nonfinite_rewards[seen:]
        if bad:
            shown = ", ".join(f"seed {s} replicate {i}" for s, i in bad[:5])
            warnings.warn(
                f"environment {self.env_factory().name!r} returned a NaN or infinite reward for {len(bad)} "
                f"completions ({shown}{', ...' if len(bad) > 5 else ''}); scored as its minimum reward",
                stacklevel=2,
            )
        return groups

    def score(self, seed: int, completions: Sequence[Completion]) -> list[Rollout]:
        env = self.env_factory()
        env.reset(seed)
        group = []
        for i, c in enumerate(completions):
            result = env.step(c.text)
            reward, components, success = float(result.reward), dict(result.components), bool(result.success)
            if not math.isfinite(reward):
                # A bug in a reward function must not poison the group's advantages (and every
                # gradient with them): the completion scores as the worst possible answer.
                lowest = float(env.reward_bounds[0])
                if not math.isfinite(lowest):
                    raise ValueError(
                        f"environment {env.name!r} returned reward {reward} for problem seed {seed} "
                        f"(replicate {i}) and declares no finite minimum reward in reward_bounds"
                    )
                self.nonfinite_rewards.append((seed, i))
                reward, success = lowest, False
                components = {k: 0.0 for k in components}
            group.append(
                Rollout(
                    problem_seed=seed,
                    replicate=i,
                    prompt_ids=list(c.prompt_ids),
                    completion_ids=list(c.token_ids),
                    behaviour_logprobs=list(c.logprobs),
                    finish_reason=c.finish_reason,
                    text=c.text,
                    reward=reward,
                    components=components,
                    success=success,
                )
            )
        return group


def assign_advantages(
    groups: list[list[Rollout]], scale: str = "group", eps: float = 1e-4, mask_truncated: bool = False
) -> None:
    """Write group-relative advantages into the rollouts (in place)."""
    if not groups:
        return
    rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float64)
    adv = group_advantages(rewards, scale=scale, eps=eps)  # type: ignore[arg-type]
    for g, row in zip(groups, adv.tolist(), strict=True):
        for r, a in zip(g, row, strict=True):
            r.advantage = a
            r.trainable = not (mask_truncated and r.truncated) and len(r.completion_ids) > 0


class RolloutDataset(Dataset):
    """Map-style: item ``i`` is rollout ``i`` as tensors (prompt + completion ids, logprobs)."""

    def __init__(self, rollouts: list[Rollout]) -> None:
        self.rollouts = rollouts

    def __len__(self) -> int:
        return len(self.rollouts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rollouts[i]
        item = {
            "input_ids": torch.tensor(r.prompt_ids + r.completion_ids, dtype=torch.long),
            "prompt_len": len(r.prompt_ids),
            "behaviour_logprobs": torch.tensor(r.behaviour_logprobs, dtype=torch.float32),
            "advantage": float(r.advantage),
            "trainable": r.trainable,
        }
        return item

    def length(self, i: int) -> int:
        r = self.rollouts[i]
        return len(r.prompt_ids) + len(r.completion_ids)

    def loss_tokens(self, i: int) -> int:
        r = self.rollouts[i]
        return len(r.completion_ids) if r.trainable else 0

    def prompt_groups(self) -> list[list[int]]:
        """Indices of rollouts that share a prompt (a GRPO group), in order of appearance."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(self.rollouts):
            groups.setdefault(tuple(r.prompt_ids), []).append(i)
        return list(groups.values())


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Position ``t`` of the [B, L-1] tensors predicts token ``t + 1``."""
    width = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        input_ids[row, : len(it["input_ids"])] = it["input_ids"]
        attention_mask[row, : len(it["input_ids"])] = 1
    spans = [(it["prompt_len"] - 1, len(it["input_ids"]) - 1) for it in items]
    return {"input_ids": input_ids, "attention_mask": attention_mask, **_per_completion(items, spans, width - 1)}


def collate_shared(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch whose prompts run once (``logprobs.shared_prompt_token_logprobs``).

    ``prompt_ids`` [U, Lp] holds the distinct prompts, ``completion_ids`` [B, Lc] the
    completions and ``group_index`` [B] which prompt each belongs to; the per-token tensors
    (``loss_mask``, logprobs) are [B, Lc], position ``j`` being completion token ``j``.
    """
    keys: dict[tuple[int, ...], int] = {}
    prompts: list[torch.Tensor] = []
    group_index = []
    for it in items:
        prompt = it["input_ids"][: it["prompt_len"]]
        key = tuple(prompt.tolist())
        if key not in keys:
            keys[key] = len(prompts)
            prompts.append(prompt)
        group_index.append(keys[key])
    completions = [it["input_ids"][it["prompt_len"] :] for it in items]
    lp, lc = max(len(p) for p in prompts), max(1, max(len(c) for c in completions))
    prompt_ids = torch.full((len(prompts), lp), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), lp), dtype=torch.long)
    for row, p in enumerate(prompts):
        prompt_ids[row, : len(p)] = p
        prompt_mask[row, : len(p)] = 1
    completion_ids = torch.full((len(items), lc), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(items), lc), dtype=torch.long)
    for row, c in enumerate(completions):
        completion_ids[row, : len(c)] = c
        completion_mask[row, : len(c)] = 1
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "group_index": torch.tensor(group_index, dtype=torch.long),
        **_per_completion(items, [(0, len(c)) for c in completions], lc),
    }


def _per_completion(items: list[dict[str, Any]], spans: list[tuple[int, int]], width: int) -> dict[str, torch.Tensor]:
    """The per-token tensors ``[B, width]`` (loss mask, behaviour logprobs), each
    row's completion at its ``span``, and the per-sequence advantages."""
    b = len(items)
    out = {"loss_mask": torch.zeros((b, width)), "behaviour_logprobs": torch.zeros((b, width))}
    for row, (it, (start, stop)) in enumerate(zip(items, spans, strict=True)):
        if it["trainable"]:
            out["loss_mask"][row, start:stop] = 1.0
        for k in out.keys() - {"loss_mask"}:
            out[k][row, start:stop] = it[k]
    out["advantages"] = torch.tensor([it["advantage"] for it in items], dtype=torch.float32)
    return out


@dataclass
class MicroBatch:
    """Which rollouts one ``training_step`` sees, and what it must do after the backward."""

    indices: list[int]
    step_end: bool
    """Run the optimizer step after this micro-batch."""
    normalizer: Normalizer
    pass_index: int = 0
    step: int = 0
    """The optimizer step of the iteration it belongs to (0 = the first, over all passes)."""


def build_schedule(
    dataset: RolloutDataset,
    *,
    num_iterations: int,
    steps_per_iteration: int,
    micro_batch_size: int,
    max_tokens_per_micro_batch: int | None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    share_prompts: bool = False,
) -> list[MicroBatch]:
    """The micro-batches of one iteration for ``rank``: ``num_iterations`` passes over the
    rollouts, each pass split into ``steps_per_iteration`` optimizer steps.

    With ``share_prompts`` the unit of splitting is a prompt's whole group, so each prompt
    runs once per micro-batch; ``micro_batch_size`` still counts sequences (rounded to whole
    groups) and a group's token cost is its prompt plus its completions.

    Every rank gets the same number of micro-batches per step (DDP needs matching backward
    calls), padded with empty micro-batches where the token-budget plan is uneven. Each
    step's ``Normalizer`` counts the step's sequences and tokens over all ranks, so the loss
    is the same however the step is cut into micro-batches.
    """
    units = dataset.prompt_groups() if share_prompts else [[i] for i in range(len(dataset))]
    if len(units) < steps_per_iteration:
        units = [[i] for u in units for i in u]  # too few groups to give every step one
    unit_size = max(1, round(len(dataset) / max(1, len(units))))
    schedule: list[MicroBatch] = []
    for p in range(num_iterations):
        order = torch.randperm(len(units), generator=torch.Generator().manual_seed(sampling_seed(seed, p))).tolist()
        chunks = [sorted(order[k::steps_per_iteration]) for k in range(steps_per_iteration)]
        for c, step_units in enumerate(chunks):
            step_indices = [i for u in step_units for i in units[u]]
            norm = Normalizer(
                # Every completion counts, masked or empty ones too (TRL's grpo/dr_grpo).
                num_sequences=len(step_indices),
                num_tokens_local=0,
                num_tokens_global=sum(dataset.loss_tokens(i) for i in step_indices),
                world_size=world_size,
            )
            # Deal the step's units to the ranks, then cut each rank's share into micro-batches
            # (micro_batch_size is per device, as in Lightning), so every rank does its part.
            plans = []
            for r in range(world_size):
                shard = step_units[r::world_size]
                plan = plan_micro_batches(
                    [_unit_cost(dataset, units[u], share_prompts) for u in shard],
                    micro_batch_size=None if max_tokens_per_micro_batch else max(1, micro_batch_size // unit_size),
                    max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                )
                plans.append([[i for j in mb for i in units[shard[j]]] for mb in plan])
            per_rank = max(len(plan) for plan in plans)
            mine = plans[rank] + [[] for _ in range(per_rank - len(plans[rank]))]
            local_tokens = sum(dataset.loss_tokens(i) for mb in mine for i in mb)
            local = Normalizer(
                num_sequences=norm.num_sequences,
                num_tokens_local=local_tokens,
                num_tokens_global=norm.num_tokens_global,
                world_size=world_size,
            )
            for k, mb in enumerate(mine):
                schedule.append(MicroBatch(indices=mb, step_end=k == len(mine) - 1, normalizer=local, pass_index=p,
                                       step=p * steps_per_iteration + c))
    return schedule


def _unit_cost(dataset: RolloutDataset, unit: list[int], shared: bool) -> int:
    """Tokens a unit of rollouts puts through the model: a shared prompt counts once."""
    if not shared:
        return sum(dataset.length(i) for i in unit)
    prompt = len(dataset.rollouts[unit[0]].prompt_ids)
    return prompt + sum(dataset.length(i) - prompt for i in unit)


class MicroBatchDataset(Dataset):
    """Map-style over the iteration's micro-batches: item ``k`` is micro-batch ``k``, collated."""

    def __init__(self, rollouts: RolloutDataset, schedule: list[MicroBatch], pad_id: int, share_prompts: bool = False) -> None:
        self.rollouts = rollouts
        self.schedule = schedule
        self.pad_id = pad_id
        self.collate = collate_shared if share_prompts else collate

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, k: int) -> dict[str, Any]:
        mb = self.schedule[k]
        # An empty micro-batch (DDP padding) still runs a forward/backward with zero loss.
        items = [self.rollouts[i] for i in mb.indices] or [_empty_item(self.pad_id)]
        batch: dict[str, Any] = self.collate(items, self.pad_id)
        batch["step_end"] = mb.step_end
        batch["rollout_indices"] = list(mb.indices)
        batch["policy_versions"] = [self.rollouts.rollouts[i].policy_version for i in mb.indices]
        batch["step"] = mb.step
        # A plain dict: Lightning's device transfer refuses frozen dataclasses.
        batch["normalizer"] = asdict(mb.normalizer)
        return batch


def _empty_item(pad_id: int) -> dict[str, Any]:
    return {
        "input_ids": torch.tensor([pad_id, pad_id]),
        "prompt_len": 1,
        "behaviour_logprobs": torch.zeros(1),
        "advantage": 0.0,
        "trainable": False,
    }
