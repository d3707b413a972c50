"""Response objects in the shape of the OpenAI Python client's, built from our outputs."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class ChatMessage:
    content: str | None
    role: str = "assistant"
    tool_calls: list[dict] | None = None


@dataclass
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: dict | None = None  # {"content": [{token, logprob, bytes, top_logprobs}]}


@dataclass
class ChoiceDelta:
    content: str | None = None
    role: str | None = None
    tool_calls: list[dict] | None = None


@dataclass
class ChatChunkChoice:
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: dict | None = None


@dataclass
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict | None = None  # {tokens, token_logprobs, top_logprobs, text_offset}


@dataclass
class _Response:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChatCompletion(_Response):
    choices: list[ChatChoice] = field(default_factory=list)
    usage: Usage | None = None
    object: str = "chat.completion"


@dataclass
class ChatCompletionChunk(_Response):
    choices: list[ChatChunkChoice] = field(default_factory=list)
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


@dataclass
class Completion(_Response):
    choices: list[CompletionChoice] = field(default_factory=list)
    usage: Usage | None = None
    object: str = "text_completion"


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"
