"""SamplingParams, as vLLM spells them, checked when a request is submitted."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace

from tp_engine.errors import InvalidRequestError

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_SAMPLES = 64


@dataclass
class SamplingParams:
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    best_of: int | None = None     # samples drawn; the n of highest cumulative logprob kept
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    logprobs: int | None = None         # top alternatives per output token (0: the chosen)
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    # structured output, at most one: a JSON schema, a regex, one of a list of strings,
    # or any JSON object (OpenAI's response_format json_object)
    json_schema: dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:  # vLLM's spelling of "no top-k"
            self.top_k = 0
        if isinstance(self.logit_bias, dict):  # OpenAI's JSON keys are strings
            try:
                self.logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise InvalidRequestError("logit_bias keys must be token ids") from None
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} {why}, got {getattr(self, name)!r}")

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            raise bad("max_tokens", "must be a non-negative integer")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise bad("max_tokens", "may be 0 only with prompt_logprobs (echo)")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            raise bad("temperature", "must be a number between 0 and 100")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be 0 (off), -1 (off) or a positive integer")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be a non-negative integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a string or a list of non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a boolean")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_SAMPLES:
            raise bad("n", f"must be an integer from 1 to {MAX_SAMPLES}")
        if self.best_of is not None and (not _is_int(self.best_of)
                                         or not self.n <= self.best_of <= MAX_SAMPLES):
            raise bad("best_of", f"must be an integer from n to {MAX_SAMPLES}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            raise bad("repetition_penalty", "must be in (0, 100]")
        if self.logit_bias is not None and (
                not isinstance(self.logit_bias, dict)
                or not all(_is_int(k) and k >= 0 and _is_number(v) and -100 <= v <= 100
                           for k, v in self.logit_bias.items())):
            raise bad("logit_bias", "must map token ids to biases in [-100, 100]")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", "must not exceed max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer from 0 to {MAX_LOGPROBS}")
        self._validate_structured()

    def _validate_structured(self) -> None:
        given = [n for n in ("json_schema", "regex", "choice") if getattr(self, n) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) > 1:
            raise InvalidRequestError(f"at most one of json_schema, regex, choice and "
                                      f"json_object, got {', '.join(given)}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise InvalidRequestError("json_schema must be a JSON schema (a dict)")
        if self.regex is not None and not (isinstance(self.regex, str) and self.regex):
            raise InvalidRequestError("regex must be a non-empty string")
        if self.choice is not None and not (
                isinstance(self.choice, list) and self.choice
                and all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("choice must be a list of non-empty strings")

    @property
    def grammar(self) -> tuple[str, str] | None:
        """The structured-output constraint as (kind, text): "json_schema" (the schema as
        JSON), "regex", or None."""
        if self.json_schema is not None:
            return "json_schema", json.dumps(self.json_schema, sort_keys=True)
        if self.json_object:
            return "json_schema", json.dumps({"type": "object"})
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "regex", "|".join(_regex_escape(c) for c in self.choice)
        return None

    @property
    def samples(self) -> int:
        """How many sequences the request runs: best_of, else n."""
        return self.best_of or self.n

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of one of a request's samples: n = 1, and a seed of its own, so
        that seeded samples differ from each other (the first keeps the request's seed)."""
        seed = self.seed
        if seed is not None and index:
            seed = (seed + index * 0x9E3779B97F4A7C15) % 2**63
        logprobs = self.logprobs
        if self.best_of is not None and self.best_of > self.n and logprobs is None:
            logprobs = 0  # best_of ranks by cumulative logprob: the chosen ones are needed
        return replace(self, n=1, best_of=None, seed=seed, logprobs=logprobs)

    def needs_rank0_state(self) -> bool:
        """Whether rank 0 must keep anything for this request beyond the plain sampler's
        arguments."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1 or bool(self.logit_bias)
                or self.min_tokens > 0 or self.logprobs is not None
                or self.prompt_logprobs is not None or self.grammar is not None)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _regex_escape(text: str) -> str:
    # the grammar library's regexes are Rust's: escape every metacharacter
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$#&-~" else c for c in text)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))

