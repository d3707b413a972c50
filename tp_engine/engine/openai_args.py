"""OpenAI's request arguments (and vLLM's extensions) as SamplingParams, for chat and plain
completions alike; the Python API and the server both come through here."""

from __future__ import annotations

from typing import Any

from tp_engine.engine import tools as tool_calls
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.errors import InvalidRequestError

OPENAI_DEFAULT_TEMPERATURE = 1.0

# what the Python API's create() takes beyond its named arguments
EXTRA = {"top_k", "ignore_eos", "stop_token_ids", "n", "best_of", "user", "stream_options",
         "max_completion_tokens", "presence_penalty", "frequency_penalty",
         "repetition_penalty", "min_p", "logit_bias", "min_tokens", "logprobs", "top_logprobs",
         "echo", "response_format", "tools", "tool_choice", "parallel_tool_calls",
         "guided_json", "guided_regex", "guided_choice"}


def sampling_params(kind: str, max_tokens: int | None, temperature: float | None,
                    top_p: float | None, seed: int | None, stop: str | list[str] | None,
                    extra: dict[str, Any]) -> SamplingParams:
    unknown = sorted(set(extra) - EXTRA)
    if unknown:
        raise InvalidRequestError(f"unsupported parameters: {', '.join(unknown)}")
    if max_tokens is None:
        max_tokens = extra.get("max_completion_tokens")
    args: dict[str, Any] = {
        name: extra[name] for name in ("n", "best_of", "presence_penalty", "frequency_penalty",
                                       "repetition_penalty", "min_p", "logit_bias",
                                       "min_tokens", "stop_token_ids")
        if extra.get(name) is not None}
    if kind == "chat":
        if extra.get("best_of") is not None:
            raise InvalidRequestError("best_of is for completions only")
        if extra.get("logprobs"):
            args["logprobs"] = extra.get("top_logprobs") or 0
        elif extra.get("top_logprobs"):
            raise InvalidRequestError("top_logprobs needs logprobs: true")
    else:
        if extra.get("logprobs") is not None:
            args["logprobs"] = extra["logprobs"]
            if extra.get("echo"):
                args["prompt_logprobs"] = extra["logprobs"]
        if max_tokens == 0 and not extra.get("echo"):
            raise InvalidRequestError("max_tokens may be 0 only with echo")
        if max_tokens == 0 and "prompt_logprobs" not in args:
            args["prompt_logprobs"] = 0  # echo of the prompt alone: prefill, nothing drawn
    args.update(_structured(extra))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=OPENAI_DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=extra.get("top_k", 0) or 0,
        seed=seed, stop=stop, ignore_eos=extra.get("ignore_eos", False), **args)


def _structured(extra: dict[str, Any]) -> dict[str, Any]:
    """response_format, a forced tool_choice, or vLLM's guided_* as structured output."""
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    tool_calls.check_tools(tools, choice)
    if tools and choice not in (None, "none", "auto"):
        parallel = extra.get("parallel_tool_calls") is not False
        return {"json_schema": tool_calls.constraint(tools, choice, parallel)}
    fmt = extra.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                                 "json_schema"):
            raise InvalidRequestError("response_format: type must be text, json_object or "
                                      "json_schema")
        if fmt["type"] == "json_object":
            return {"json_object": True}
        if fmt["type"] == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequestError("response_format: json_schema.schema must be a "
                                          "JSON schema")
            return {"json_schema": schema}
    guided = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice"}
    return {name: extra[key] for key, name in guided.items() if extra.get(key) is not None}
