"""Tokenizer loaded straight from a Hugging Face checkpoint directory (no transformers import).

Wraps `tokenizers.Tokenizer` for encode/decode and renders chat templates with the same Jinja
environment transformers uses, so prompts are byte-identical to `apply_chat_template`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from tp_engine.errors import EngineError, InvalidRequestError

# The named special tokens transformers exposes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# A text longer than this is encoded by the batch call, which releases the GIL (the single call
# holds it: a 2 MB prompt took 2 s, and the server's event loop tokenizes in a thread); not
# always, since the batch call marks the process as having used the tokenizers' thread pool,
# and it then warns at every later fork.
LONG_TEXT = 1 << 16

# transformers copies a message's reasoning under all these names so any template finds it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by transformers for assistant masks).

    We never need the mask, so the block renders its body unchanged, in its own scope as in
    transformers.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain json.dumps output.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile `source` in the environment transformers uses for chat templates."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate and copy chat messages the way transformers prepares them for a template."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(
                f"messages[{i}] must be an object, got {type(message).__name__}"
            )
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] needs a string 'role'")
        # Templates handle a missing key better than a None value (e.g. OpenAI's content=None).
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in {path}: {e}") from e


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as plain strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class Tokenizer:
    """Encode/decode plus chat templating for one checkpoint directory."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | dict[str, str] | None = None,
        eos_token_ids: list[int] | None = None,
        bos_token_id: int | None = None,
        source: str = "<memory>",
    ) -> None:
        self._tok = tokenizer
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.source = source
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids or []))
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint directory or of a GGUF file (from its metadata)."""
        from tp_engine.model.gguf_file import find_gguf, open_gguf

        gguf = find_gguf(path)
        if gguf is None:
            return cls.from_dir(path)
        from tp_engine.engine.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(open_gguf(gguf).metadata, str(gguf))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json plus tokenizer_config, chat template and generation_config."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok_file}")
        try:
            hf_tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust loader raises a bare Exception on malformed files
            raise ValueError(f"cannot load {tok_file}: {e}") from e

        config = _read_json(root / "tokenizer_config.json")
        gen_config = _read_json(root / "generation_config.json")
        special = {k: v for k in SPECIAL_TOKEN_KEYS if (v := _token_content(config.get(k)))}

        # Same precedence as transformers: a standalone template file beats the config entry.
        template: str | dict[str, str] | None = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}
        template_file = root / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        elif (root / "chat_template.json").is_file() and template is None:
            template = _read_json(root / "chat_template.json").get("chat_template")

        bos_id = None
        if "bos_token" in special:
            bos_id = hf_tok.token_to_id(special["bos_token"])
        if bos_id is None:
            bos_id = next(iter(_as_id_list(gen_config.get("bos_token_id"))), None)

        eos_ids = _as_id_list(gen_config.get("eos_token_id"))
        if "eos_token" in special and (eos := hf_tok.token_to_id(special["eos_token"])) is not None:
            eos_ids.append(eos)

        return cls(hf_tok, special, template, eos_ids, bos_id, source=str(root))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT:
            # the batch call releases the GIL while it works; the fast one makes no offsets,
            # which, for a text of megabytes, took a quarter of a second to free, GIL held
            batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
            return batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer as a tokenizer.json text (what the grammar library reads)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _template_for(self, tools: list[dict] | None) -> str:
        template = self.chat_template
        if isinstance(template, dict):
            name = "tool_use" if tools is not None and "tool_use" in template else "default"
            if name not in template:
                raise InvalidRequestError(
                    f"{self.source} has several chat templates ({sorted(template)}) but no default"
                )
            return template[name]
        if not template:
            raise InvalidRequestError(f"{self.source} has no chat template")
        return template

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` to a prompt string exactly as transformers does.

        The rendered text already contains whatever BOS/control tokens the template emits, so
        encode it with `encode(prompt, add_special_tokens=False)` (as transformers does in
        `apply_chat_template(tokenize=True)`); otherwise a post-processor may prepend a second BOS.

        Raises InvalidRequestError when there is no template, the messages are malformed, or the
        template rejects them (e.g. via `raise_exception`).
        """
        source = self._template_for(tools)
        # Keyed by text, not name, so assigning a new `chat_template` never hits a stale entry.
        if source not in self._compiled:
            try:
                self._compiled[source] = compile_chat_template(source)
            except jinja2.TemplateSyntaxError as e:
                raise EngineError(f"chat template of {self.source} does not compile: {e}") from e
        chat = normalize_messages(messages)
        # Explicit kwargs override special tokens, matching transformers' precedence.
        variables = {**self.special_tokens, **template_kwargs}
        try:
            return self._compiled[source].render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise InvalidRequestError(f"chat template rejected the messages: {e}") from e
