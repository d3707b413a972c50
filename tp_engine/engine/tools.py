"""Tool calling in the Hermes format (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
Qwen2's and Hermes' templates): the tools shown to the model, the calls read back from its
text, and the schemas that constrain `tool_choice` "required" and a named function (as vLLM
does, the output is then the calls' JSON itself).

A template that renders no tools (SmolLM2's, most ChatML ones) gets them the way Qwen2's
template shows them, in the system message, and a tool-call history as the same tags."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from tp_engine.errors import InvalidRequestError

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def check_tools(tools: list[dict] | None, tool_choice: Any) -> None:
    names = [function_of(t).get("name") for t in tools or []]
    if not all(isinstance(n, str) and n for n in names):
        raise InvalidRequestError("tools: every tool needs a function with a name")
    if tool_choice in (None, "none", "auto"):
        return
    if tool_choice == "required":
        if not names:
            raise InvalidRequestError("tool_choice 'required' needs tools")
        return
    name = chosen_name(tool_choice)
    if name not in names:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools")


def function_of(tool: dict) -> dict:
    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
        raise InvalidRequestError('tools: each is {"type": "function", "function": {...}}')
    return tool["function"]


def chosen_name(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
        raise InvalidRequestError('tool_choice: {"type": "function", "function": {"name": ...}}')
    if tool_choice in (None, "none", "auto", "required"):
        return None
    raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required' or a function")


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def constraint(tools: list[dict], tool_choice: Any, parallel: bool = True) -> dict | None:
    """The JSON schema the output must follow for this tool_choice, or None (free text);
    `parallel` False (OpenAI's parallel_tool_calls) allows one call at most."""
    name = chosen_name(tool_choice)
    if name is not None:
        function = next(function_of(t) for t in tools if function_of(t)["name"] == name)
        return _parameters(function)
    if tool_choice == "required":
        calls = [{"type": "object", "additionalProperties": False,
                  "properties": {"name": {"const": function_of(t)["name"]},
                                 "parameters": _parameters(function_of(t))},
                  "required": ["name", "parameters"]} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        return schema if parallel else {**schema, "maxItems": 1}
    return None


def template_messages(messages: list[dict], tools: list[dict] | None, template: str,
                      ) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools to render. A template that knows tools gets them as they are;
    one that does not gets the tools in the system message and tool calls as tags."""
    if "tools" in template and "tool_call" in template:
        return messages, tools
    out = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if calls:
            tags = "\n".join(_call_tag(c) for c in calls)
            message["content"] = "\n".join(filter(None, [message.get("content"), tags]))
        if message.get("role") == "tool":
            message["content"] = f"<tool_response>\n{message.get('content', '')}\n</tool_response>"
        out.append(message)
    if tools:
        text = TOOLS_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content', '')}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def _call_tag(call: dict) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        pass
    return "<tool_call>\n" + json.dumps({"name": function.get("name"),
                                          "arguments": arguments}) + "\n</tool_call>"


def tool_call(name: str, arguments: Any) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": text}}


def parse_output(text: str, tools: list[dict], tool_choice: Any,
                 ) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a finished output."""
    name = chosen_name(tool_choice)
    if name is not None:  # the output is the arguments (constrained)
        return None, [tool_call(name, text)]
    if tool_choice == "required":  # the output is a JSON list of calls (constrained)
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [tool_call(c["name"], c.get("parameters", {})) for c in calls]
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append(tool_call(call["name"], call.get("arguments", {})))
    if not calls:
        return text, []
    content = TOOL_CALL.sub("", text).strip()
    return content or None, calls
