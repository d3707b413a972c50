"""Structured output's grammars, with llguidance: made from a request's JSON schema or regex,
and checked by the controller when the request is submitted (see grammar_matcher for rank 0's
side).

Why llguidance and not xgrammar (vLLM's default): xgrammar requires transformers and triton
(a gigabyte) and imports transformers when it loads, 3.6 s on this machine; llguidance is one
wheel with no dependencies and reads a tokenizer.json as it is."""

from __future__ import annotations

from tp_engine.errors import InvalidRequestError


def llguidance():
    try:
        import llguidance
    except ImportError:
        raise InvalidRequestError("structured output needs the llguidance package: "
                                  "pip install llguidance") from None
    return llguidance


def grammar_text(kind: str, text: str) -> str:
    """The llguidance grammar for a SamplingParams.grammar pair."""
    matcher = llguidance().LLMatcher
    if kind == "json_schema":
        # any whitespace between the tokens would let a random model pad for ever
        return matcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    if kind == "regex":
        return matcher.grammar_from_regex(text)
    raise ValueError(f"unknown grammar kind {kind!r}")


def check_grammar(kind: str, text: str) -> None:
    """Raise InvalidRequestError for a schema or regex the library refuses (the controller
    checks at submission, so that rank 0 never meets a bad one)."""
    try:
        grammar = grammar_text(kind, text)
    except ValueError as e:
        raise InvalidRequestError(f"structured output: {e}") from None
    error = llguidance().LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"structured output: {error}")


