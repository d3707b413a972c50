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


@dataclass
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None


@dataclass
class ChoiceDelta:
    content: str | None = None
    role: str | None = None


@dataclass
class ChatChunkChoice:
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None


@dataclass
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


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
