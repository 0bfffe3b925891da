"""Request bodies of the HTTP API (pydantic, so the OpenAPI document describes them) and their limits.

Fields follow OpenAI's completions and chat completions; unknown fields are ignored, as OpenAI does.
Limits here are the static ones (a body's shape); the ones that depend on the server (max_tokens
against the context length, the prompt's length) are checked in app.py, naming the field and limit.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field

MAX_STOP = 4  # as OpenAI
MAX_PROMPT_CHARS = 1 << 20
MAX_MESSAGES = 256


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[Annotated[str, Field(max_length=256)], Annotated[list[Annotated[str, Field(max_length=256)]],
                Field(max_length=MAX_STOP)], None] = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    user: str | None = Field(None, max_length=256)

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s[:256] for s in stop]


class CompletionRequest(Sampling):
    prompt: Union[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)],
                  Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]], Field(max_length=1)]]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=MAX_PROMPT_CHARS)


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)


class LoadAdapter(BaseModel):
    lora_name: str = Field(..., max_length=256)
    lora_path: str = Field(..., max_length=4096)


class UnloadAdapter(BaseModel):
    lora_name: str = Field(..., max_length=256)
    lora_int_id: int | None = None
