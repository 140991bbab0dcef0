"""Shared fixtures: the tiny-sat preset is built once per machine (cached) and reused.

The suite runs in parallel (pytest-xdist, ``-n auto --dist loadfile`` in pyproject.toml): each
file stays on one worker, so a module-scoped run fixture is computed once; ``-n 0`` runs
serially."""

from __future__ import annotations

import os

import pytest

from grpo_lightning.models import load_policy, load_tokenizer, resolve_model_path

MAX_WORKERS = 4
"""Each worker imports the training stack, and most end-to-end tests run a trainer and a server
process of their own: beyond a few workers a bigger machine gains little (the longest file
takes about three minutes) and only adds memory."""


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the suite also runs without xdist (-p no:xdist)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Files with end-to-end runs first (a stable sort keeps each file's own order): the workers
    # start on the long files and the short ones fill in at the end, instead of one worker
    # finishing the longest file alone.
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
