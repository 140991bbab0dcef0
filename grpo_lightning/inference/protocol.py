"""The built-in server's request schema and error shape (OpenAI / vLLM compatible).

Fields follow vLLM's ``/v1/completions`` (``return_token_ids``, ``top_k``, ``min_tokens``,
``stop_token_ids``, ``ignore_eos``, ``skip_special_tokens``) so one client body works against
both servers. Unknown fields are ignored, as vLLM does; ``null`` means "the default".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

# Token ids must be real integers: pydantic would otherwise read ``true`` or ``"5"`` as one.
TokenIds = list[StrictInt]


class CompletionRequest(BaseModel):
    """Body of ``POST /v1/completions``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | TokenIds | list[str] | list[TokenIds]
    max_tokens: int | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    seed: int | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool | None = None
    logprobs: int | None = None
    return_token_ids: bool | None = None
    skip_special_tokens: bool | None = None
    add_special_tokens: bool | None = None
    stream: bool | None = None
    echo: bool | None = None
    stop: str | list[str] | None = None


@dataclass(frozen=True)
class SamplingOptions:
    """A request's sampling settings after validation: what the engine sees."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    top_logprobs: int = 0


class UpdateWeightsRequest(BaseModel):
    """Body of ``POST /update_weights_from_disk`` (SGLang's route and payload)."""

    model_config = ConfigDict(extra="ignore")

    model_path: Annotated[str, Field(min_length=1)]


class LoadLoRAAdapterRequest(BaseModel):
    """Body of ``POST /v1/load_lora_adapter`` (vLLM's route and fields,
    vllm/entrypoints/serve/lora/protocol.py)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: Annotated[str, Field(min_length=1)]
    lora_path: Annotated[str, Field(min_length=1)]


class UnloadLoRAAdapterRequest(BaseModel):
    """Body of ``POST /v1/unload_lora_adapter`` (vLLM's)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: Annotated[str, Field(min_length=1)]


ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_body(status: int, message: str) -> dict:
    """OpenAI's error envelope, which the ``openai`` client turns into typed exceptions."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "Error"),
            "param": None,
            "code": status,
        }
    }
