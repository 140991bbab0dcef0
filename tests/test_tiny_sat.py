"""The tiny-sat preset: deterministic, loadable with transformers' Auto classes, generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_lightning.envs.sat import CLOSE_TAG, OPEN_TAG, SATEnv, format_answer, generate_problem
from grpo_lightning.models import cache_dir, load_tokenizer, resolve_model_path
from grpo_lightning.tiny_sat import TinySatRecipe, build_tiny_sat


@pytest.mark.slow
def test_builds_byte_identical(tiny_sat_path: str, tmp_path: Path) -> None:
    """A second build (as on a fresh machine) writes the same bytes as the cached preset."""
    again = build_tiny_sat(tmp_path / "again", TinySatRecipe())
    cached = Path(tiny_sat_path)
    names = sorted(p.name for p in cached.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (cached / name).read_bytes() == (again / name).read_bytes(), name


def test_resolves_to_a_cached_folder(tiny_sat_path: str) -> None:
    # The folder is named by the recipe's hash: another recipe can never load stale bytes.
    assert Path(tiny_sat_path) == cache_dir() / f"tiny-sat-{TinySatRecipe().digest()}"
    assert TinySatRecipe(cold_start_steps=201).digest() != TinySatRecipe().digest()
    weights = Path(tiny_sat_path, "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("tiny-sat") == tiny_sat_path  # found, not rebuilt
    assert Path(tiny_sat_path, "model.safetensors").stat().st_mtime_ns == weights
    assert resolve_model_path("/some/local/model") == "/some/local/model"


def test_loads_with_auto_classes_and_generates(tiny_sat_path: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_sat_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_sat_path)
    assert model.config.model_type == "qwen2"
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 5_000_000
    env = SATEnv()
    messages = env.reset(4242)
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=32, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id  # it finishes
    text = tok.decode(new, skip_special_tokens=True)
    # The cold start taught the answer format: a well-formed assignment of the right size.
    result = env.step(text)
    assert result.info["well_formed"], text
    assert result.info["num_bits"] == generate_problem(4242).num_vars


def test_tokenizer_round_trips_the_sat_alphabet(tiny_sat_path: str) -> None:
    tok = load_tokenizer(tiny_sat_path)
    env = SATEnv()
    for seed in (0, 1099, 5000, 123456):
        messages = env.reset(seed)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < 3 * len(env.problem.clauses) * 3 + 80  # literals are single tokens
        answer = format_answer(generate_problem(seed).solution)
        assert tok.decode(tok(answer, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == answer
    odd = "héllo ✓ 🤖 \t\n <SOLUTION> x12 NOT x3 </SOLUTION> 0 1"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    # Tags survive skip_special_tokens; chat markers and EOS do not.
    ids = tok(f"{OPEN_TAG}1{CLOSE_TAG}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == f"{OPEN_TAG}1{CLOSE_TAG}"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template
