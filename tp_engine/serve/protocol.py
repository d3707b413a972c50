"""The request bodies of the OpenAI endpoints as pydantic models: a wrong type or an unsupported
feature is a 400 naming the field before anything reaches the engine; a field the server does
not know is ignored with a warning, as vLLM does (clients send fields of their own: guidellm's
stream_options.continuous_usage_stats, SDKs' newer fields). Value ranges (temperature, top_p,
max_tokens...) are left to SamplingParams.validate, so that they are checked in one place for
the Python API and the server alike."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tp_engine.engine.openai import prompts_of

log = logging.getLogger("tp_engine.serve")


class _Lenient(BaseModel):
    """Unknown fields are kept aside, logged, and never used."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _warn_unknown(self) -> _Lenient:
        if self.model_extra:
            log.warning("%s: ignored unknown fields %s", type(self).__name__,
                        ", ".join(sorted(self.model_extra)))
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk


class _Request(_Lenient):
    """What chat and plain completions share (OpenAI's fields, then vLLM's extras)."""

    model: str
    max_tokens: int | None = None  # None: up to the context
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    # the fields passed on to the engine's create() as its extra arguments
    EXTRA: ClassVar[tuple[str, ...]] = (
        "n", "presence_penalty", "frequency_penalty", "logit_bias", "response_format", "top_k",
        "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
        "guided_json", "guided_regex", "guided_choice")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def extra_args(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.EXTRA
                if getattr(self, name) is not None}

    def sampling_args(self) -> dict[str, Any]:
        """Keyword arguments for tp_engine.engine.openai.sampling_params."""
        return dict(kind="chat" if isinstance(self, ChatCompletionRequest) else "completion",
                    max_tokens=self.effective_max_tokens(), temperature=self.temperature,
                    top_p=self.top_p, seed=self.seed, stop=self.stop, extra=self.extra_args())


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # extra fields (name, tool_call_id...) are kept: the chat template may use them
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        # only an assistant's tool calls stand without content
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def to_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # text parts read as one text, as in vLLM
            message["content"] = "\n".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    EXTRA: ClassVar[tuple[str, ...]] = (*_Request.EXTRA, "logprobs", "top_logprobs", "tools",
                                        "tool_choice", "parallel_tool_calls")

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for plain completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    EXTRA: ClassVar[tuple[str, ...]] = (*_Request.EXTRA, "echo", "logprobs", "best_of")

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("is not supported")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or several (lm-eval batches them), each a choice."""
        return prompts_of(self.prompt)
