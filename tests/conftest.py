"""Shared fixtures: the tiny-sat preset is built once per machine (cached) and reused."""

from __future__ import annotations

import pytest

from grpo_lightning.models import load_policy, load_tokenizer, resolve_model_path


@pytest.fixture(scope="session")
def tiny_sat_path() -> str:
    return resolve_model_path("tiny-sat")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_sat_path: str):
    return load_tokenizer(tiny_sat_path)


@pytest.fixture(scope="session")
def tiny_model(tiny_sat_path: str):
    return load_policy(tiny_sat_path).eval()
