"""The SAT environment: golden problems, rewards checked against a real solver, malformed answers."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_lightning.envs import make_env
from grpo_lightning.envs.sat import (
    CLOSE_TAG,
    OPEN_TAG,
    SATEnv,
    difficulty_of,
    format_answer,
    generate_problem,
    satisfiable_fraction,
)

# Pinned forever: changing generation changes every experiment's problems.
GOLDEN = {
    0: (7, [(5, -6, 2), (-4, -3, -6), (-4, 7, 3), (-5, 3, -2), (4, -3, -6), (-1, 4, 7), (-3, 2, -4), (-1, 6, 3)]),
    1234: (7, [(5, 6, -3), (-6, 4, -1), (-6, 5, -7), (4, 7, -2), (-1, 5, 3), (-4, -2, -6), (-2, -5, -3), (2, -4, -5)]),
    5099: (
        7,
        [(6, 4, 5), (2, 1, -6), (6, 5, -1), (6, 5, -4), (-1, -6, -3), (-1, 3, -5), (-7, -4, -1), (1, 2, -4),
         (-4, -5, -7), (-3, 5, 6), (-4, -7, 3)],
    ),
}

SEEDS = range(1000, 1300)


@pytest.mark.parametrize("seed", sorted(GOLDEN))
def test_golden_problems(seed: int) -> None:
    n, clauses = GOLDEN[seed]
    problem = generate_problem(seed)
    assert problem.num_vars == n
    assert len(problem.clauses) == len(clauses)
    assert list(problem.clauses) == clauses


def test_size_ranges_follow_difficulty() -> None:
    for seed in range(0, 2000, 7):
        d = difficulty_of(seed)
        p = generate_problem(seed)
        assert 4 + math.floor(11 * d / 2) <= p.num_vars <= 4 + math.floor(11 * d)
        assert 5 + math.floor(15 * d / 2) <= len(p.clauses) <= 5 + math.floor(15 * d)
        for clause in p.clauses:
            assert len({abs(lit) for lit in clause}) == 3
            assert all(1 <= abs(lit) <= p.num_vars for lit in clause)
    assert difficulty_of(0) == pytest.approx(0.3)
    assert difficulty_of(1099) == pytest.approx(0.696)
    assert difficulty_of("not-an-int") == pytest.approx(0.48)


def test_prompt_lists_every_clause() -> None:
    env = SATEnv()
    messages = env.reset(1234)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert user.splitlines()[0] == "Variables: 7"
    assert "(x5 OR x6 OR NOT x3)" in user
    assert user.count("(") == 8
    assert OPEN_TAG in messages[0]["content"] and CLOSE_TAG in messages[0]["content"]


def _brute_force_satisfiable(seed: int) -> bool:
    p = generate_problem(seed)
    return any(p.is_satisfied_by(list(a)) for a in itertools.product([False, True], repeat=p.num_vars))


def test_solver_agrees_with_brute_force() -> None:
    for seed in range(2000, 2100):
        assert generate_problem(seed).satisfiable == _brute_force_satisfiable(seed)


def test_solver_assignment_gets_maximum_reward_and_flip_loses_success() -> None:
    env = SATEnv()
    lo, hi = env.reward_bounds
    checked_flips = 0
    for seed in SEEDS:
        env.reset(seed)
        problem = env.problem
        assert problem is not None and problem.satisfiable
        solution = problem.solution
        assert solution is not None and problem.is_satisfied_by(solution)
        result = env.step(format_answer(solution))
        assert result.success
        assert result.reward == pytest.approx(hi)
        assert result.reward == pytest.approx(sum(result.components.values()))
        # An unsatisfying assignment: flip single variables until a clause breaks.
        for v in range(problem.num_vars):
            flipped = list(solution)
            flipped[v] = not flipped[v]
            if not problem.is_satisfied_by(flipped):
                wrong = env.step(format_answer(flipped))
                assert not wrong.success
                assert wrong.components["correctness"] == 0.0
                assert wrong.reward == pytest.approx(hi - 1.0)
                checked_flips += 1
                break
    assert checked_flips > 200


def test_bounds() -> None:
    lo, hi = SATEnv().reward_bounds
    assert lo == pytest.approx(-0.2)
    assert hi == pytest.approx(1.135)


def _answer(n: int) -> str:
    return " ".join("1" for _ in range(n))


# Each malformed class of answer with the reward the reference implementation documents for it (seed 1234 has n = 7).
MALFORMED = {
    "no answer": ("I think x1 is true.", -0.2),
    "only an open tag": (f"{OPEN_TAG}1 0 1 1 0 1 0", -0.2),
    "close before open": (f"{CLOSE_TAG}1 0 1 1 0 1 0{OPEN_TAG}", -0.2),
    # soft 0.02 + no_trailing 0.02 (answer exists) + shape 0.045 (7 bits) = -0.115
    "other characters": (f"{OPEN_TAG}1 0 1 1 0 1 0 x{CLOSE_TAG}", -0.2 + 0.02 + 0.045 + 0.02),
    # soft 0.02 + charset 0.005 + shape 0.045 + no_trailing 0.1 * (0.2 - 0.001 * 5)
    "text after the closing tag": (f"{OPEN_TAG}{_answer(7)}{CLOSE_TAG} done", -0.2 + 0.02 + 0.005 + 0.045 + 0.1 * 0.195),
    # soft 0.02 + charset 0.005 + no_trailing 0.02, no shape
    "too few bits": (f"{OPEN_TAG}{_answer(6)}{CLOSE_TAG}", -0.2 + 0.02 + 0.005 + 0.02),
    "too many bits": (f"{OPEN_TAG}{_answer(8)}{CLOSE_TAG}", -0.2 + 0.02 + 0.005 + 0.02),
    "empty answer": (f"{OPEN_TAG}{CLOSE_TAG}", -0.2 + 0.02 + 0.005 + 0.02),
    # The reference's bug, reproduced on purpose: EOS text left in the completion is trailing text.
    "EOS text kept": (f"{OPEN_TAG}{_answer(7)}{CLOSE_TAG}<|im_end|>", -0.111),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_answers_get_documented_reward(case: str) -> None:
    env = SATEnv()
    env.reset(1234)
    text, expected = MALFORMED[case]
    result = env.step(text)
    assert result.reward == pytest.approx(expected)
    assert not result.success
    assert result.components["correctness"] == pytest.approx(-0.2)


def test_repeated_blocks_are_not_strict() -> None:
    env = SATEnv()
    env.reset(1234)
    sol = generate_problem(1234).solution
    assert sol is not None
    twice = format_answer(sol) + format_answer(sol)
    result = env.step(twice)
    assert result.components["strict"] == 0.0
    assert result.components["correctness"] == pytest.approx(-0.2)  # text after the first close tag


def test_trailing_whitespace_is_not_trailing_text() -> None:
    env = SATEnv()
    env.reset(1234)
    sol = generate_problem(1234).solution
    assert sol is not None
    result = env.step("Reasoning first.\n" + format_answer(sol) + "\n  ")
    assert result.success and result.reward == pytest.approx(1.135)


def test_correct_answer_followed_by_eos_token_succeeds(tiny_tokenizer) -> None:
    """The completion as the trainer sees it: token ids with EOS, decoded without special tokens."""
    env = SATEnv()
    for seed in range(1000, 1050):
        env.reset(seed)
        sol = generate_problem(seed).solution
        ids = tiny_tokenizer(format_answer(sol), add_special_tokens=False)["input_ids"]
        ids = ids + [tiny_tokenizer.eos_token_id]
        text = tiny_tokenizer.decode(ids, skip_special_tokens=True)
        result = env.step(text)
        assert result.success
        assert result.reward == pytest.approx(1.135)


def test_only_satisfiable_and_difficulty_filters() -> None:
    env = make_env("sat", only_satisfiable=True, max_difficulty=0.34)
    accepted = [s for s in range(1000, 1200) if env.accepts(s)]
    assert accepted and all(s % 100 <= 10 for s in accepted)
    assert all(generate_problem(s).satisfiable for s in accepted)
    assert satisfiable_fraction(list(SEEDS)) == 1.0
    with pytest.raises(ValueError, match="min_difficulty"):
        SATEnv(min_difficulty=0.6, max_difficulty=0.4)
    with pytest.raises(ValueError, match="unknown environment"):
        make_env("chess")


def test_step_before_reset_raises() -> None:
    with pytest.raises(RuntimeError, match="before reset"):
        SATEnv().step("x")


_env = SATEnv()
_env.reset(1234)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.binary().map(lambda b: b.decode("latin-1")),
        st.lists(st.sampled_from([OPEN_TAG, CLOSE_TAG, "0", "1", " ", "\n", "x", "<|im_end|>", "\x00"])).map("".join),
        st.integers(0, 200_000).map(lambda k: OPEN_TAG + "1 " * k + CLOSE_TAG),
    )
)
def test_any_completion_gives_bounded_finite_reward(text: str) -> None:
    result = _env.step(text)
    lo, hi = _env.reward_bounds
    assert math.isfinite(result.reward)
    assert lo - 1e-9 <= result.reward <= hi + 1e-9
    assert result.reward == pytest.approx(sum(result.components.values()))
    assert result.success == (result.components["correctness"] == 1.0)
