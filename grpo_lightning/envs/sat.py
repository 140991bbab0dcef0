"""Random 3-SAT with a shaped reward.

Problem semantics (kept from the offline GRPO runner this project replaces):
a problem is drawn from the string form of an integer seed ``s`` with
``rng = random.Random(sha256(str(s)).digest())``. Its difficulty is
``d = 0.3 + (s % 100) / 250``; ``n = randint(4 + floor(11 d / 2), 4 + floor(11 d))`` variables and
``m = randint(5 + floor(15 d / 2), 5 + floor(15 d))`` clauses follow, each clause three distinct
variables drawn with ``rng.sample`` and each negated when ``rng.random() < 0.5``.

Reward (weights x values, see ``REWARD_WEIGHTS``), range -0.2 .. 1.135:

| component    | weight | value                                                              |
|--------------|--------|--------------------------------------------------------------------|
| correctness  | 1.00   | 1 satisfied, 0 not satisfied, -0.2 not well formed                 |
| strict       | 0.15   | 0.3: one open and one close tag, nothing after, only bits, n bits  |
| soft         | 0.10   | 0.2: an answer block exists                                        |
| shape        | 0.15   | 0.3: the answer has exactly n bits                                 |
| no_trailing  | 0.10   | max(0, 0.2 - 0.001 * characters after the closing tag)             |
| charset      | 0.05   | 0.1: the answer holds only 0, 1 and whitespace                     |

"Well formed" means: an answer block exists, it holds only 0/1/whitespace, exactly n bits,
and nothing but whitespace follows the closing tag. Decisions where the reference is silent:
whitespace after the closing tag is not trailing text (a newline before EOS is harmless),
each 0/1 character is one bit, tags are matched exactly and case-sensitively, and the first
open tag with the first close tag after it delimit the answer.

The caller passes the completion decoded with special tokens removed, so an end-of-sequence
token after a perfect answer cannot count as trailing text (the reference's bug).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
from dataclasses import dataclass

from pysat.solvers import Solver

from .base import Environment, Message, StepResult

OPEN_TAG = "<SOLUTION>"
CLOSE_TAG = "</SOLUTION>"
DEFAULT_DIFFICULTY = 0.48
MIN_REWARD = -0.2

REWARD_WEIGHTS: dict[str, float] = {
    "correctness": 1.0,
    "strict": 0.15,
    "soft": 0.10,
    "shape": 0.15,
    "no_trailing": 0.10,
    "charset": 0.05,
}

SYSTEM_PROMPT = (
    "You are a SAT solver. Think step by step, then give the final assignment of "
    f"x1..xN as space-separated 0/1 values between {OPEN_TAG} and {CLOSE_TAG}."
)

_ONLY_BITS = re.compile(r"[01\s]*")


def difficulty_of(seed: int | str) -> float:
    """The reference's difficulty rule: ``0.3 + (seed % 100) / 250`` for integer seeds."""
    try:
        return 0.3 + (int(seed) % 100) / 250
    except ValueError:
        return DEFAULT_DIFFICULTY


@dataclass(frozen=True)
class SATProblem:
    """A 3-SAT instance; literals are signed 1-based variable indices (``-2`` is NOT x2)."""

    seed: str
    num_vars: int
    clauses: tuple[tuple[int, int, int], ...]

    @property
    def difficulty(self) -> float:
        return difficulty_of(self.seed)

    def to_text(self) -> str:
        lines = [f"Variables: {self.num_vars}", "Clauses:"]
        for clause in self.clauses:
            lits = (f"NOT x{-lit}" if lit < 0 else f"x{lit}" for lit in clause)
            lines.append("(" + " OR ".join(lits) + ")")
        return "\n".join(lines)

    def is_satisfied_by(self, assignment: list[bool]) -> bool:
        if len(assignment) != self.num_vars:
            return False
        return all(any(assignment[abs(lit) - 1] == (lit > 0) for lit in c) for c in self.clauses)

    @functools.cached_property
    def solution(self) -> list[bool] | None:
        """A satisfying assignment from a CDCL solver (MiniSat 2.2), or None if unsatisfiable."""
        with Solver(name="m22", bootstrap_with=[list(c) for c in self.clauses]) as solver:
            if not solver.solve():
                return None
            model = solver.get_model() or []
        values = {abs(lit): lit > 0 for lit in model}
        # Variables that occur in no clause are free; the solver may omit them.
        return [values.get(v, False) for v in range(1, self.num_vars + 1)]

    @property
    def satisfiable(self) -> bool:
        return self.solution is not None


@functools.lru_cache(maxsize=65536)
def generate_problem(seed: int | str) -> SATProblem:
    """The problem for ``seed``; the same seed gives the same problem forever (golden-tested)."""
    s = str(seed)
    rng = random.Random(hashlib.sha256(s.encode()).digest())
    d = difficulty_of(s)
    n = rng.randint(4 + math.floor(11 * d / 2), 4 + math.floor(11 * d))
    m = rng.randint(5 + math.floor(15 * d / 2), 5 + math.floor(15 * d))
    clauses = []
    for _ in range(m):
        variables = rng.sample(range(1, n + 1), 3)
        clauses.append(tuple(-v if rng.random() < 0.5 else v for v in variables))
    return SATProblem(seed=s, num_vars=n, clauses=tuple(clauses))


@dataclass(frozen=True)
class ParsedAnswer:
    has_answer: bool
    answer_text: str
    num_open: int
    num_close: int
    trailing: int
    """Characters after the closing tag, trailing whitespace excluded."""
    only_bits: bool
    bits: list[int]


def parse_answer(completion: str) -> ParsedAnswer:
    """Find the answer block: the first open tag and the first close tag after it."""
    num_open = completion.count(OPEN_TAG)
    num_close = completion.count(CLOSE_TAG)
    start = completion.find(OPEN_TAG)
    end = completion.find(CLOSE_TAG, start + len(OPEN_TAG)) if start >= 0 else -1
    if start < 0 or end < 0:
        return ParsedAnswer(False, "", num_open, num_close, 0, False, [])
    answer = completion[start + len(OPEN_TAG) : end]
    trailing = len(completion[end + len(CLOSE_TAG) :].rstrip())
    only_bits = _ONLY_BITS.fullmatch(answer) is not None
    bits = [int(ch) for ch in answer if ch in "01"]
    return ParsedAnswer(True, answer, num_open, num_close, trailing, only_bits, bits)


def reward_components(problem: SATProblem, completion: str) -> tuple[dict[str, float], ParsedAnswer]:
    """Unweighted component values for ``completion`` (see the module docstring)."""
    p = parse_answer(completion)
    n_bits_ok = p.has_answer and len(p.bits) == problem.num_vars
    well_formed = p.has_answer and p.only_bits and n_bits_ok and p.trailing == 0
    if not well_formed:
        correctness = -0.2
    else:
        correctness = 1.0 if problem.is_satisfied_by([b == 1 for b in p.bits]) else 0.0
    strict = well_formed and p.num_open == 1 and p.num_close == 1
    values = {
        "correctness": correctness,
        "strict": 0.3 if strict else 0.0,
        "soft": 0.2 if p.has_answer else 0.0,
        "shape": 0.3 if n_bits_ok else 0.0,
        "no_trailing": max(0.0, 0.2 - 0.001 * p.trailing) if p.has_answer else 0.0,
        "charset": 0.1 if p.has_answer and p.only_bits else 0.0,
    }
    return values, p


def format_answer(assignment: list[bool] | list[int]) -> str:
    """The canonical well-formed answer for an assignment."""
    return OPEN_TAG + " ".join(str(int(v)) for v in assignment) + CLOSE_TAG


class SATEnv(Environment):
    """Random 3-SAT with the shaped reward of the module docstring."""

    name = "sat"

    def __init__(
        self,
        only_satisfiable: bool = False,
        min_difficulty: float = 0.0,
        max_difficulty: float = 1.0,
    ) -> None:
        """
        Args:
            only_satisfiable: draw only problems the solver can satisfy (``accepts`` is False
                for the others), so success 1.0 is reachable on every problem.
            min_difficulty: skip seeds whose difficulty ``0.3 + (seed % 100) / 250`` is lower.
            max_difficulty: skip seeds whose difficulty is higher (0.696 is the largest).
        """
        if min_difficulty > max_difficulty:
            raise ValueError(
                f"min_difficulty ({min_difficulty}) must not exceed max_difficulty ({max_difficulty})"
            )
        self.only_satisfiable = only_satisfiable
        self.min_difficulty = min_difficulty
        self.max_difficulty = max_difficulty
        self.problem: SATProblem | None = None

    def accepts(self, seed: int) -> bool:
        if not self.min_difficulty <= difficulty_of(seed) <= self.max_difficulty:
            return False
        return not self.only_satisfiable or generate_problem(seed).satisfiable

    def reset(self, seed: int) -> list[Message]:
        self.problem = generate_problem(seed)
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self.problem.to_text()},
        ]

    def step(self, completion: str) -> StepResult:
        if self.problem is None:
            raise RuntimeError("SATEnv.step called before reset")
        values, parsed = reward_components(self.problem, completion)
        weighted = {k: REWARD_WEIGHTS[k] * v for k, v in values.items()}
        return StepResult(
            reward=sum(weighted.values()),
            components=weighted,
            success=values["correctness"] == 1.0,
            info={
                "num_vars": self.problem.num_vars,
                "num_clauses": len(self.problem.clauses),
                "satisfiable": self.problem.satisfiable,
                "well_formed": values["correctness"] >= 0.0,
                "num_bits": len(parsed.bits),
            },
        )

    @property
    def reward_bounds(self) -> tuple[float, float]:
        best = {"correctness": 1.0, "strict": 0.3, "soft": 0.2, "shape": 0.3, "no_trailing": 0.2, "charset": 0.1}
        return MIN_REWARD, sum(REWARD_WEIGHTS[k] * v for k, v in best.items())

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(REWARD_WEIGHTS)


def satisfiable_fraction(seeds: list[int]) -> float:
    """Share of ``seeds`` whose problem is satisfiable (the success ceiling)."""
    if not seeds:
        return 0.0
    return sum(generate_problem(s).satisfiable for s in seeds) / len(seeds)
