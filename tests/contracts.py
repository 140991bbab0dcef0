"""Shared by the contract tests against the installed vLLM / SGLang packages.

They run where the ``vllm`` or ``sglang`` extra is installed (``.ci/run`` installs each into its
own environment) and are skipped elsewhere; with ``GRPO_LIGHTNING_REQUIRE_CONTRACTS=1`` (CI) a
missing package fails instead of skipping, so the contracts cannot silently stop being checked.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest

from grpo_lightning.inference.client import GenerationRequest, SamplingParams

PROMPT = [9707, 11, 1879, 374]


def request(**params) -> GenerationRequest:
    """Three completions of ``PROMPT``, seeds 11, 12, 13, at most 5 tokens; ``params`` override."""
    return GenerationRequest(prompt_ids=PROMPT, n=3, seed=11, params=SamplingParams(**{"max_tokens": 5, **params}))


def require(package: str) -> None:
    """Skip the calling test module unless ``package`` is installed (fail under CI)."""
    if importlib.util.find_spec(package) is not None:
        return
    if os.environ.get("GRPO_LIGHTNING_REQUIRE_CONTRACTS") == "1":
        pytest.fail(f"{package} is not installed but GRPO_LIGHTNING_REQUIRE_CONTRACTS=1", pytrace=False)
    pytest.skip(f"the {package} extra is not installed (uv sync --extra {package})", allow_module_level=True)


def method_parameters(module: str, cls: str, method: str) -> list[str]:
    """Parameter names of ``cls.method`` (``*args``/``**kwargs`` marked) read from the installed
    source, for modules that only import with a GPU."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    tree = ast.parse(Path(spec.origin).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    args = item.args
                    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                    names += [f"*{args.vararg.arg}"] if args.vararg else []
                    return names + ([f"**{args.kwarg.arg}"] if args.kwarg else [])
    raise AssertionError(f"{module}.{cls}.{method} not found")


def undeclared_keys(data, model) -> set[str]:
    """Keys of ``data`` that the pydantic ``model`` (recursively) does not declare: fields a
    server with ``extra="allow"`` would silently ignore."""
    import typing

    from pydantic import BaseModel

    found: set[str] = set()
    if not isinstance(data, dict):
        return found
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            found.add(key)
            continue
        for sub in _models_in(fields[key].annotation, typing, BaseModel):
            items = value if isinstance(value, list) else [value]
            for item in items:
                found |= {f"{key}.{k}" for k in undeclared_keys(item, sub)}
    return found


def _models_in(annotation, typing, base) -> list:
    if isinstance(annotation, type) and issubclass(annotation, base):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg, typing, base)]
