"""Write a small random Hugging Face checkpoint (weights, config, tokenizer) without transformers.

Used by tests and by `tp-engine make-tiny-model` so the engine can be exercised end to end without
downloading anything. The output loads unchanged in `transformers.AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tp_engine.model.loader import DTYPES

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS, EOS, IM_START, IM_END = range(4)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# What transformers' Qwen2Tokenizer hard-codes (it ignores the pipeline in tokenizer.json), so the
# tiny qwen2 checkpoint tokenizes identically in tp_engine and in transformers.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Ordered by English letter frequency so the earliest (always included) merges are the useful ones.
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
# Non-ASCII characters that get merges: some become single tokens, others sharing their lead bytes
# end up split across a merged prefix and a raw byte, which exercises incremental detokenization.
_MULTIBYTE_WORDS = "é è à ç ñ ö ü ä ß — “ ” … 的 一 是 不 了 人 我 在 有 中 日 本 語 😀"


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _candidate_merges(byte_chars: list[str]) -> Iterator[tuple[str, str]]:
    """Yield merge pairs in rank order; the caller drops ones whose parts are not in the vocab."""
    space = byte_chars[ord(" ")]
    for c in _LETTERS:
        yield space, c
    for a in _LETTERS:
        for b in _LETTERS:
            yield a, b
    for c in _LETTERS.upper():
        yield space, c
    for word in _MULTIBYTE_WORDS.split():
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        for i in range(1, len(chars)):
            yield "".join(chars[:i]), chars[i]
    for a in _LETTERS:
        for b in _LETTERS:
            yield space + a, b
    for length in range(2, 5):
        # Extend every existing lowercase n-gram (with or without a leading space) by one letter.
        for prefix in _ngrams(length):
            for c in _LETTERS:
                yield space + prefix, c
                yield prefix, c


def _ngrams(length: int) -> Iterator[str]:
    if length == 0:
        yield ""
        return
    for prefix in _ngrams(length - 1):
        for c in _LETTERS:
            yield prefix + c


def build_tokenizer(vocab_size: int, arch: str = "llama") -> HFTokenizer:
    """Byte-level BPE with exactly `vocab_size` entries: 4 specials, 256 bytes, then merges.

    llama/mistral use the GPT-2 style ByteLevel pipeline and prepend `<s>`; qwen2 copies Qwen2's
    NFC + digit-splitting pipeline and adds no BOS (so only NFC text round-trips exactly there).
    """
    byte_chars = _bytes_to_unicode()
    if vocab_size < len(SPECIAL_TOKENS) + len(byte_chars):
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + byte_chars)}
    merges: list[tuple[str, str]] = []
    for left, right in _candidate_merges(byte_chars):
        if len(vocab) == vocab_size:
            break
        merged = left + right
        if left in vocab and right in vocab and merged not in vocab:
            vocab[merged] = len(vocab)
            merges.append((left, right))
    if len(vocab) != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is larger than the merge generator supports")

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    if arch == "qwen2":
        tok.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if arch != "qwen2":
        bos = SPECIAL_TOKENS[BOS]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, BOS)]
        )
    return tok


def _random_weights(
    cfg: dict, gen: torch.Generator, dtype: torch.dtype, qkv_bias: bool
) -> dict[str, torch.Tensor]:
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    w = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(q_out, hidden)
        w[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden)
        w[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden)
        if qkv_bias:
            w[p + "self_attn.q_proj.bias"] = normal(q_out)
            w[p + "self_attn.k_proj.bias"] = normal(kv_out)
            w[p + "self_attn.v_proj.bias"] = normal(kv_out)
        w[p + "self_attn.o_proj.weight"] = normal(hidden, q_out)
        w[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        w[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        w[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        w[p + "input_layernorm.weight"] = torch.ones(hidden)
        w[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    w["model.norm.weight"] = torch.ones(hidden)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(cfg["vocab_size"], hidden)
    return {k: v.to(dtype).contiguous() for k, v in w.items()}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 3,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    vocab_size: int = 8003,
    intermediate_size: int = 512,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a random `arch` checkpoint into `out_dir` (created if needed); return the path."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    if tie_word_embeddings is None:
        # Mirrors the small real checkpoints: Qwen2 ties embeddings, Llama/Mistral do not.
        tie_word_embeddings = arch == "qwen2"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": tie_word_embeddings,
        "dtype": dtype,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif arch == "mistral":
        cfg["sliding_window"] = None
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    _write_json(out / "config.json", cfg)

    gen = torch.Generator().manual_seed(seed)
    weights = _random_weights(cfg, gen, DTYPES[dtype], qkv_bias=arch == "qwen2")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    write_tokenizer(out, arch, vocab_size, max_position_embeddings)
    return out


def write_tokenizer(out: Path, arch: str, vocab_size: int, model_max_length: int) -> None:
    """The tokenizer, chat template and generation config of a tiny checkpoint; also used to
    give a checkpoint written by transformers the files an engine needs."""
    build_tokenizer(vocab_size, arch).save(str(out / "tokenizer.json"))
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    tok_cfg = {
        "added_tokens_decoder": {
            str(i): {"content": t, **special, "special": True} for i, t in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": SPECIAL_TOKENS[BOS],
        "eos_token": SPECIAL_TOKENS[EOS],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if arch == "qwen2":
        # Otherwise transformers' Qwen2Tokenizer appends an <|endoftext|> unk/pad token.
        tok_cfg.update(unk_token=None, pad_token=None)
    _write_json(out / "tokenizer_config.json", tok_cfg)
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS, "eos_token_id": [EOS, IM_END]},
    )
