"""A `Tokenizer` built from a GGUF file's metadata, the same one transformers builds from it.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and special
token ids as metadata. We rebuild the `tokenizers` pipeline transformers' GGUF loader makes of them
(transformers/integrations/gguf/gguf_tokenizer_mapping.py), without importing transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tp_engine.engine.tokenizer import Tokenizer

# llama.cpp token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4

# Splits transformers applies before byte-level BPE for these `tokenizer.ggml.pre` values; any
# other value keeps GPT-2's own ByteLevel regex, as transformers does.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
}
# transformers gives llama-type vocabularies of these architectures tokenizers of their own.
_OTHER_SENTENCEPIECE = ("gemma", "gemma2", "gemma3", "phi3")
_Need = Callable[[str], Any]  # metadata[key], or a ValueError naming the missing key


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte (index = byte value)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files have no merges: every split of a piece into two known pieces is a
    merge ranked by the piece's score, ties by shorter halves, then by the halves' ids."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in dict(zip(tokens, scores)).items():
        halves = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        halves = sorted((h for h in halves if h[0] in vocab and h[1] in vocab),
                        key=lambda h: (vocab[h[0]], vocab[h[1]]))
        ranked += [(left, right, score) for left, right in halves]
    # One stable sort, highest first, so equal keys keep the order above (as transformers does).
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _byte_level(meta: dict[str, Any], tokens: list[str], need: _Need) -> HFTokenizer:
    spell = _byte_alphabet()
    alphabet = set(spell)
    # A token written in plain text (a space, say) is looked up in its byte-alphabet spelling.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in need("tokenizer.ggml.merges")]
    tok = HFTokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict[str, Any], tokens: list[str], need: _Need) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, need("tokenizer.ggml.scores"))
    # byte_fallback: a character outside the vocabulary becomes its UTF-8 bytes <0x..>.
    tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # "▁" stands for a space; the text gets one in front ("first": not after special tokens).
    # transformers always adds it; we also honour llama.cpp's add_space_prefix = false.
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def tokenizer_from_gguf(metadata: dict[str, Any], source: str) -> Tokenizer:
    """The tokenizer a GGUF file describes; `metadata` holds its keys as plain Python values.

    Raises ValueError (naming `source` and the key) for a missing key or an unsupported model.
    """

    def need(key: str) -> Any:
        if key not in metadata:
            raise ValueError(f"{source}: the metadata lacks {key}")
        return metadata[key]

    kind = need("tokenizer.ggml.model")
    tokens: list[str] = need("tokenizer.ggml.tokens")
    arch = metadata.get("general.architecture")
    if kind == "gpt2":
        tok = _byte_level(metadata, tokens, need)
    elif kind == "llama" and arch not in _OTHER_SENTENCEPIECE:
        tok = _sentencepiece(metadata, tokens, need)
    elif kind == "llama":
        raise ValueError(f"{source}: tokenizer.ggml.model 'llama' of general.architecture "
                         f"{arch!r} is not supported")
    else:
        raise ValueError(f"{source}: tokenizer.ggml.model {kind!r} is not supported "
                         "(gpt2 and llama are)")

    def token_at(key: str) -> str | None:
        index = metadata.get(key)
        if index is None:
            return None
        if not 0 <= index < len(tokens):
            raise ValueError(f"{source}: {key} {index} is outside the {len(tokens)} tokens")
        return tokens[index]

    # Control tokens (<|im_start|>...) match whole and are special (skipped by decode); user
    # defined ones (<think>) match whole but stay text. A byte-level "control" token not written
    # in the byte alphabet is a llama.cpp mislabel and transformers leaves it out, as do we.
    vocab = tok.get_vocab()
    types = metadata.get("tokenizer.ggml.token_type") or []
    byte_level = set(_byte_alphabet()) if kind == "gpt2" else None
    control = [t for t, k in zip(tokens, types)
               if k == CONTROL and (byte_level is None or set(t) <= byte_level)]
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    names = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
             "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
    special = {name: t for name, key in names.items() if (t := token_at(f"tokenizer.ggml.{key}"))}
    # The named tokens are special too, unless already added above. transformers would append
    # one missing from the vocabulary under a new id past the model's; we never add ids.
    added = set(control) | set(user)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in dict.fromkeys(special.values())
                            if t not in added and t in vocab])

    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos)
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False) and eos)
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    single = [f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos
    pair = single + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(bos, bos_id)] * add_bos
        + [(eos, metadata.get("tokenizer.ggml.eos_token_id"))] * add_eos,
    )

    # llama.cpp's end-of-turn / end-of-message tokens end generation too.
    stops = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return Tokenizer(tok, special, metadata.get("tokenizer.chat_template"),
                     [i for i in stops if i is not None], bos_id, source=source)
