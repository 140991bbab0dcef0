"""Shared fixtures: the tiny-sat preset is built once per machine (cached) and reused.

The suite runs in parallel (pytest-xdist, ``-n auto --maxprocesses 4 --dist loadfile`` in
pyproject.toml): each file stays on one worker, so a module-scoped run fixture is computed once.
Beyond a few workers a bigger machine gains little (the longest file takes about three minutes,
and most end-to-end tests run a trainer and a server of their own). ``-n 0`` runs serially."""

from __future__ import annotations

import pytest

from grpo_lightning.models import load_policy, load_tokenizer, resolve_model_path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # On xdist workers only (a serial run keeps the quick tests first): the files with end-to-end
    # runs first, each in its own order (a stable sort), so the workers start on the long files
    # and the short ones fill in at the end instead of one worker finishing a long file alone.
    if not hasattr(config, "workerinput"):
        return
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def tiny_sat_path() -> str:
    return resolve_model_path("tiny-sat")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_sat_path: str):
    return load_tokenizer(tiny_sat_path)


@pytest.fixture(scope="session")
def tiny_model(tiny_sat_path: str):
    return load_policy(tiny_sat_path).eval()
