"""Rollout batches: advantages, collation, the iteration's micro-batch schedule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from grpo_lightning.logprobs import sequence_token_logprobs, shared_prompt_token_logprobs
from grpo_lightning.rollouts import (
    MicroBatchDataset,
    Rollout,
    RolloutDataset,
    assign_advantages,
    build_schedule,
    collate,
    collate_shared,
    sampling_seed,
)


def rollout(seed: int, rep: int, prompt: list[int], completion: list[int], reward: float, reason: str = "stop") -> Rollout:
    return Rollout(
        problem_seed=seed, replicate=rep, prompt_ids=prompt, completion_ids=completion,
        behaviour_logprobs=[-0.5 - 0.1 * k for k in range(len(completion))], finish_reason=reason,
        text="", reward=reward, components={}, success=reward > 1,
    )


def groups_of(p: int, g: int) -> list[list[Rollout]]:
    out = []
    for s in range(p):
        prompt = list(range(10 + s, 15 + 2 * s))  # prompts of different lengths
        out.append([rollout(s, r, prompt, [40 + r] * (1 + (s + r) % 4), float(r % 3)) for r in range(g)])
    return out


def test_sampling_seed_is_stable() -> None:
    assert sampling_seed(0, "train", 3, 17) == 410765458  # pinned: the same in every process, forever
    assert sampling_seed(0, "train", 3, 17) != sampling_seed(1, "train", 3, 17)
    assert 0 <= sampling_seed("x") < 2**31


def test_advantages_and_truncation_mask() -> None:
    groups = [
        [rollout(0, 0, [1], [2], 1.0), rollout(0, 1, [1], [3], 0.0)],
        [rollout(1, 0, [1], [2], 0.5), rollout(1, 1, [1], [3], 0.5)],  # all equal
        [rollout(2, 0, [1], [2, 3], 1.0, "length"), rollout(2, 1, [1], [3], 0.0)],
    ]
    assign_advantages(groups, scale="group", eps=0.0, mask_truncated=True)
    assert [r.advantage for r in groups[0]] == pytest.approx([1.0, -1.0])
    assert [r.advantage for r in groups[1]] == [0.0, 0.0]
    assert groups[2][0].trainable is False and groups[2][1].trainable is True


def test_collate_aligns_targets_and_behaviour_logprobs() -> None:
    ds = RolloutDataset([rollout(0, 0, [5, 6, 7], [8, 9], 1.0), rollout(1, 0, [5, 6], [8, 9, 10], 0.0)])
    batch = collate([ds[0], ds[1]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 8, 9, 10]]
    # Position t predicts token t + 1: the loss covers exactly the completion tokens.
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert batch["behaviour_logprobs"][0, 2:].tolist() == pytest.approx([-0.5, -0.6])
    assert batch["behaviour_logprobs"][1, 1:].tolist() == pytest.approx([-0.5, -0.6, -0.7])


def test_shared_collation_gives_the_same_logprobs_as_full_sequences(tiny_model) -> None:
    groups = groups_of(3, 4)
    rollouts = [r for g in groups for r in g]
    ds = RolloutDataset(rollouts)
    items = [ds[i] for i in range(len(ds))]
    full, shared = collate(items, pad_id=0), collate_shared(items, pad_id=0)
    assert shared["prompt_ids"].shape[0] == 3 and shared["group_index"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with torch.no_grad():
        a, _ = sequence_token_logprobs(tiny_model, full["input_ids"], full["attention_mask"],
                                       loss_positions=full["loss_mask"].bool())
        b, _ = shared_prompt_token_logprobs(tiny_model, shared["prompt_ids"], shared["prompt_mask"],
                                            shared["completion_ids"], shared["completion_mask"], shared["group_index"],
                                            loss_positions=shared["loss_mask"].bool())
    assert torch.allclose(a[full["loss_mask"].bool()], b[shared["loss_mask"].bool()], atol=1e-5)
    assert torch.equal(full["behaviour_logprobs"][full["loss_mask"].bool()], shared["behaviour_logprobs"][shared["loss_mask"].bool()])


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize(("steps", "mu", "budget"), [(1, 1, None), (2, 3, None), (3, 2, 64)])
def test_schedule_covers_every_rollout_once_per_pass(share: bool, steps: int, mu: int, budget: int | None) -> None:
    ds = RolloutDataset([r for g in groups_of(6, 4) for r in g])
    schedule = build_schedule(ds, num_iterations=mu, steps_per_iteration=steps, micro_batch_size=8,
                              max_tokens_per_micro_batch=budget, seed=3, share_prompts=share)
    for p in range(mu):
        seen = [i for mb in schedule if mb.pass_index == p for i in mb.indices]
        assert sorted(seen) == list(range(len(ds)))
    assert sum(mb.step_end for mb in schedule) == mu * steps
    # Each micro-batch knows its optimizer step of the iteration (the proximal interpolation
    # counts them): 0, 1, ... over all passes, a step's micro-batches ending at its step_end.
    step = 0
    for mb in schedule:
        assert mb.step == step and mb.pass_index == step // steps
        step += mb.step_end
    for mb in schedule:
        # The normaliser counts the whole step, whatever micro-batch this is.
        assert mb.normalizer.num_tokens_global == mb.normalizer.num_tokens_local
    if share:
        for mb in schedule:  # groups stay whole, so each prompt runs once per micro-batch
            seeds = {ds.rollouts[i].problem_seed for i in mb.indices}
            assert sum(1 for r in ds.rollouts if r.problem_seed in seeds) == len(mb.indices)
    for r in ds.rollouts:
        r.policy_version = r.problem_seed % 3
    micro = MicroBatchDataset(ds, schedule, pad_id=0, share_prompts=share)
    assert ("prompt_ids" in micro[0]) == share
    for k, mb in enumerate(schedule):
        assert micro[k]["step"] == mb.step
        assert micro[k]["policy_versions"] == [ds.rollouts[i].problem_seed % 3 for i in mb.indices]


def test_schedule_shards_evenly_over_ranks() -> None:
    ds = RolloutDataset([r for g in groups_of(5, 4) for r in g])
    kw = dict(num_iterations=2, steps_per_iteration=1, micro_batch_size=4, max_tokens_per_micro_batch=None, seed=1)
    single = build_schedule(ds, **kw)
    r0 = build_schedule(ds, rank=0, world_size=2, **kw)
    r1 = build_schedule(ds, rank=1, world_size=2, **kw)
    assert len(r0) == len(r1)  # matching backward calls under DDP
    for p in range(2):
        both = [i for s in (r0, r1) for mb in s if mb.pass_index == p for i in mb.indices]
        assert sorted(both) == sorted(i for mb in single if mb.pass_index == p for i in mb.indices)
    assert r0[0].normalizer.num_tokens_global == single[0].normalizer.num_tokens_global
    assert r0[0].normalizer.num_tokens_local + r1[0].normalizer.num_tokens_local == single[0].normalizer.num_tokens_global
    # A step that fits one micro-batch is still split over the ranks: both do half the work.
    kw = dict(num_iterations=2, steps_per_iteration=2, micro_batch_size=16, max_tokens_per_micro_batch=None,
              seed=1, world_size=2, share_prompts=True)
    ds = RolloutDataset([r for g in groups_of(4, 4) for r in g])
    for rank in (0, 1):
        assert [len(mb.indices) for mb in build_schedule(ds, rank=rank, **kw)] == [4, 4, 4, 4]


@pytest.mark.slow
def test_dynamic_sampling_replaces_groups_without_signal() -> None:
    """On the real built-in server: the first round is the plain iteration's generation; every
    all-equal group is dropped and replaced by a fresh training problem that has signal."""
    from grpo_lightning.data import RolloutDataModule
    from grpo_lightning.inference.launch import ServerConfig
    from grpo_lightning.inference.service import RolloutService

    # G = 2 at the cold-started policy: about half the groups get equal rewards.
    common = dict(problems_per_iteration=8, rollouts_per_problem=2, max_tokens=24, temperature=1.0,
                  top_p=1.0, top_k=0, env_args={"max_difficulty": 0.34}, server=ServerConfig(device="cpu"))
    dynamic = RolloutDataModule(dynamic_sampling=True, dynamic_sampling_max_rounds=5, **common)
    dynamic.setup("fit")
    service = dynamic.service
    try:
        # The same server, the recipe without dynamic sampling.
        plain = RolloutService(service.server, dynamic.tokenizer, dynamic.make_env,
                               dataclasses.replace(dynamic.recipe, dynamic_sampling=False)).start()
        base, base_stats = plain.iteration(0)
        groups, stats = service.iteration(0)
    finally:
        dynamic.teardown("fit")

    def signal(group) -> bool:
        return len({r.reward for r in group}) > 1

    flat = [[r.completion_ids for r in g] for g in base if signal(g)]
    assert 0 < len(flat) < 8 and base_stats["rollout/dynamic_sampling_rounds"] == 0
    assert [[r.completion_ids for r in g] for g in groups[: len(flat)]] == flat  # same first round
    assert len(groups) == 8 and all(signal(g) for g in groups)
    assert stats["rollout/groups_trained"] == 8 and stats["rollout/dynamic_sampling_rounds"] >= 1
    seeds = stats["problem_seeds"]
    assert len(set(seeds)) == 8 and set(seeds) <= set(dynamic.train_seeds)
    refills = seeds[len(flat):]
    assert not set(refills) & set(dynamic.recipe.iteration_seeds(0))  # fresh problems, not this iteration's
    assert all(g[0].problem_seed == s for g, s in zip(groups, seeds, strict=True))
    # Nonzero advantages that sum to zero within each kept group.
    for g in groups:
        assert any(r.advantage != 0 for r in g) and sum(r.advantage for r in g) == pytest.approx(0, abs=1e-6)
    # The logged reward statistics count every completion generated, refills included.
    assert stats["rollout/frac_reward_zero_std"] > 0


def test_grpo_normaliser_counts_masked_completions_like_trl() -> None:
    """A truncated completion masked out of the loss adds nothing to the sum but still counts in
    the mean over sequences (TRL: ``(sum_t m l / |y|).mean()`` over every row)."""
    from grpo_lightning.loss import LossConfig, aggregation_weights

    group = [rollout(0, 0, [1], [2, 3], 1.0), rollout(0, 1, [1], [3], 0.0), rollout(0, 2, [1], [4, 4, 4], 0.5, "length")]
    assign_advantages([group], scale="none", eps=0.0, mask_truncated=True)
    ds = RolloutDataset(group)
    (mb,) = build_schedule(ds, num_iterations=1, steps_per_iteration=1, micro_batch_size=8, max_tokens_per_micro_batch=None)
    assert mb.normalizer.num_sequences == 3
    batch = MicroBatchDataset(ds, [mb], pad_id=0)[0]
    for loss_type, expected in (("grpo", [[1 / 6, 1 / 6, 0], [1 / 3, 0, 0], [0, 0, 0]]), ("dr_grpo", [[1 / 9, 1 / 9, 0], [1 / 9, 0, 0], [0, 0, 0]])):
        cfg = LossConfig(loss_type=loss_type, max_completion_length=3)
        weights = aggregation_weights(batch["loss_mask"], cfg, mb.normalizer)
        assert weights.flatten().tolist() == pytest.approx(sum(expected, [])), loss_type
