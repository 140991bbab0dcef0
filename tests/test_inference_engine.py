"""The batched engine in-process: batching invariance, failures, cancellation, weight checks."""

from __future__ import annotations

import asyncio

import pytest
import torch

import grpo_lightning.inference.engine as engine_module
from grpo_lightning.inference.engine import GenerationEngine
from grpo_lightning.inference.protocol import SamplingOptions
from grpo_lightning.models import load_policy, stop_token_ids


@pytest.fixture(scope="module")
def engine(tiny_sat_path, tiny_tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine thread and pytest share two cores
    eng = GenerationEngine(
        load_policy(tiny_sat_path), stop_token_ids(tiny_tokenizer, tiny_sat_path), max_batch_size=8
    )
    eng.start()
    yield eng
    eng.close()
    torch.set_num_threads(threads)


TEXTS = ["Variables: 7\nClauses:\n(x1 OR NOT x2)\n", "Variables: 3\n", "(x1 OR x2 OR NOT x3)\n"]


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    return [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def test_batch_size_limit_and_batching_do_not_change_seeded_samples(engine, prompts):
    opts = SamplingOptions(max_tokens=12, min_tokens=12, temperature=1.3)

    async def run():
        alone = await engine.generate([prompts[0]], opts, [1])
        # 3 prompts x 4 seeds = 12 sequences through a batch of 8: some wait for a free row.
        crowd = await engine.generate([p for p in prompts for _ in range(4)], opts, list(range(12)))
        again = await engine.generate([prompts[0]] * 2, opts, [1, 2])
        return alone, crowd, again

    alone, crowd, again = asyncio.run(run())
    assert alone[0].token_ids == again[0].token_ids == crowd[1].token_ids
    assert again[1].token_ids == crowd[2].token_ids
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in crowd)


def test_rows_joining_and_leaving_mid_batch_change_no_ones_samples(engine, tiny_tokenizer, monkeypatch):
    """Sequences join a running batch (into free rows, or by rebuilding it when a longer prompt
    arrives) and leave it at different steps (the last row takes a finished row's place, dead
    padding columns are trimmed): every sequence gets the tokens and logprobs it gets alone."""
    texts = ["Variables: 3\n", "(x1 OR x2)\n", "Variables: 7\nClauses:\n" + "(x1 OR NOT x2 OR x3)\n" * 20]
    short, other, long = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    waves = [  # (prompt, seed, max_tokens): three waves, admitted while the earlier ones run
        [(short, 10, 100), (other, 11, 5), (short, 12, 9)],
        [(other, 20, 3), (short, 21, 14), (other, 22, 30)],
        [(long, 30, 6), (short, 31, 11)],
    ]
    counts = {"add_rows": 0, "moved": 0, "assemble": 0}
    for name in ("add_rows", "move_rows"):
        method = getattr(engine_module._GrowingLayer, name)

        def counted(self, *args, _method=method, _name=name):
            if _name == "add_rows" or args[0].numel():
                counts["add_rows" if _name == "add_rows" else "moved"] += 1
            return _method(self, *args)

        monkeypatch.setattr(engine_module._GrowingLayer, name, counted)
    assemble = engine_module._assemble

    def counted_assemble(*args):
        counts["assemble"] += 1
        return assemble(*args)

    monkeypatch.setattr(engine_module, "_assemble", counted_assemble)

    def opts(max_tokens: int) -> SamplingOptions:
        return SamplingOptions(max_tokens=max_tokens, min_tokens=max_tokens, temperature=1.0)

    async def run():
        tasks = []
        for wave in waves:
            tasks += [asyncio.ensure_future(engine.generate([p], opts(m), [seed])) for p, seed, m in wave]
            await asyncio.sleep(0)
            started = engine.load[0]
            while engine.load[0] <= started and any(not t.done() for t in tasks):
                await asyncio.sleep(0.001)  # this wave is in the batch: the next one joins it
        together = [(await t)[0] for t in tasks]
        seen = dict(counts)
        alone = [(await engine.generate([p], opts(m), [seed]))[0] for wave in waves for p, seed, m in wave]
        return together, alone, seen

    together, alone, seen = asyncio.run(run())
    for t, a in zip(together, alone, strict=True):
        assert t.token_ids == a.token_ids
        assert max(abs(x - y) for x, y in zip(t.logprobs, a.logprobs, strict=True)) < 1e-4
    assert [len(t.token_ids) for t in together] == [m for wave in waves for _, _, m in wave]
    # Each path ran: joins into free rows, a finished row replaced by the last one, and rebuilds
    # (the first wave, the long prompt joining, a trim).
    assert seen["add_rows"] >= 1 and seen["moved"] >= 1 and seen["assemble"] >= 3, seen


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(
    engine, prompts, monkeypatch
):
    opts = SamplingOptions(max_tokens=4)
    calls = {"n": 0}
    forward = engine._forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        asyncio.run(engine.generate([prompts[1]], opts, [1]))
    assert engine.alive
    assert len(asyncio.run(engine.generate([prompts[1]], opts, [1]))[0].token_ids) >= 1


def test_cancelled_requests_leave_the_batch(engine, prompts):
    async def run():
        slow = asyncio.ensure_future(
            engine.generate([prompts[2]], SamplingOptions(max_tokens=400, ignore_eos=True), [0])
        )
        while engine.load[0] == 0:
            await asyncio.sleep(0.001)
        slow.cancel()
        while engine.load[0] != 0:
            await asyncio.sleep(0.001)
        return await engine.generate([prompts[0]], SamplingOptions(max_tokens=3), [1])

    assert len(asyncio.run(run())[0].token_ids) >= 1


def test_weights_must_fit_the_served_model(engine):
    params = {k: v.clone() for k, v in engine.model.state_dict().items() if k != "lm_head.weight"}
    engine.check_weights(params)  # tied lm_head may be absent
    with pytest.raises(ValueError, match="unexpected"):
        engine.check_weights({**params, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        engine.check_weights({**params, "model.norm.weight": torch.zeros(3)})
    del params["model.norm.weight"]
    with pytest.raises(ValueError, match="missing"):
        engine.check_weights(params)


def test_a_stopped_engine_refuses_requests_and_weight_swaps_instead_of_hanging(tiny_sat_path, tiny_tokenizer):
    eng = GenerationEngine(load_policy(tiny_sat_path), stop_token_ids(tiny_tokenizer, tiny_sat_path))
    eng.start()
    tensors = {k: v.clone() for k, v in eng.model.state_dict().items()}
    eng.close()

    def copy_in(model) -> None:
        model.load_state_dict(tensors)

    async def swap():
        await asyncio.wait_for(eng.swap_weights(copy_in, "x", "p"), timeout=5)

    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(swap())
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(eng.generate([[1, 2, 3]], SamplingOptions(max_tokens=2), [0]))
