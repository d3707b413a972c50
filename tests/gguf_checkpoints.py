"""Tiny random GGUF checkpoints written with the `gguf` package, in llama.cpp's layout: its
tensor names, its q/k row order for Llama, one tensor type for every matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from tokenizers.pre_tokenizers import ByteLevel

# K-quant rows hold 256 values: every matrix's row length (its input size) is a multiple
SHAPE = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=260)
# a byte-level BPE of the gpt2 kind: the 256 byte symbols, three merges and an end of text
MERGES = ["h e", "l l", "he ll"]
EOS = "<|endoftext|>"
# where the f16 scales sit in a block of the types gguf cannot quantize: (offset, value)
_K_SCALES = {"Q4_K": [(0, 2e-4), (2, 1e-4)], "Q5_K": [(0, 1e-4), (2, 5e-5)],
             "Q6_K": [(208, 5e-4)]}


def _encode(rows: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator):
    """`rows` in `qtype` (random blocks with sane scales for the K-quants, which the gguf
    package can read but not write)."""
    if qtype == GGMLQuantizationType.F32:
        return rows
    if qtype == GGMLQuantizationType.F16:
        return rows.astype(np.float16)
    if qtype.name not in _K_SCALES:
        return quantize(rows, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows.size // block, size), dtype=np.uint8)
    for offset, scale in _K_SCALES[qtype.name]:
        d = (scale * rng.uniform(0.5, 1.5, size=blocks.shape[0])).astype(np.float16)
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows.shape[0], -1)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rotate_half halves become interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_gguf(path: Path, qtype: str = "F32", arch: str = "llama", seed: int = 0,
               tied: bool = False) -> Path:
    """A random model of SHAPE with every matrix in `qtype` (norms in F32); Qwen2 gets q/k/v
    biases. Returns the file's path."""
    rng = np.random.default_rng(seed)
    kind = GGMLQuantizationType[qtype]
    s = SHAPE
    head_dim = s["hidden"] // s["heads"]
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}-{qtype}")
    writer.add_context_length(256)
    writer.add_embedding_length(s["hidden"])
    writer.add_block_count(s["layers"])
    writer.add_feed_forward_length(s["intermediate"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(s["vocab"])
    writer.add_file_type(0 if qtype == "F32" else 1)
    _add_tokenizer(writer)

    def matrix(name: str, rows: int, cols: int, heads: int | None = None) -> None:
        w = (0.2 * rng.standard_normal((rows, cols))).astype(np.float32)
        if heads is not None and arch == "llama":
            w = _permute(w, heads)
        plain = kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        writer.add_tensor(name, _encode(w, kind, rng), raw_dtype=None if plain else kind)

    def vector(name: str, size: int, around: float = 0.0) -> None:
        writer.add_tensor(name, (around + 0.1 * rng.standard_normal(size)).astype(np.float32))

    matrix("token_embd.weight", s["vocab"], s["hidden"])
    for i in range(s["layers"]):
        vector(f"blk.{i}.attn_norm.weight", s["hidden"], 1.0)
        matrix(f"blk.{i}.attn_q.weight", s["hidden"], s["hidden"], s["heads"])
        matrix(f"blk.{i}.attn_k.weight", s["kv_heads"] * head_dim, s["hidden"], s["kv_heads"])
        matrix(f"blk.{i}.attn_v.weight", s["kv_heads"] * head_dim, s["hidden"])
        if arch == "qwen2":
            vector(f"blk.{i}.attn_q.bias", s["hidden"])
            vector(f"blk.{i}.attn_k.bias", s["kv_heads"] * head_dim)
            vector(f"blk.{i}.attn_v.bias", s["kv_heads"] * head_dim)
        matrix(f"blk.{i}.attn_output.weight", s["hidden"], s["hidden"])
        vector(f"blk.{i}.ffn_norm.weight", s["hidden"], 1.0)
        matrix(f"blk.{i}.ffn_gate.weight", s["intermediate"], s["hidden"])
        matrix(f"blk.{i}.ffn_up.weight", s["intermediate"], s["hidden"])
        matrix(f"blk.{i}.ffn_down.weight", s["hidden"], s["intermediate"])
    vector("output_norm.weight", s["hidden"], 1.0)
    if not tied:
        matrix("output.weight", s["vocab"], s["hidden"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: GGUFWriter) -> None:
    tokens = [*sorted(ByteLevel.alphabet()), *(m.replace(" ", "") for m in MERGES), EOS]
    assert len(tokens) == SHAPE["vocab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.NORMAL] * (len(tokens) - 1) + [TokenType.CONTROL])
    writer.add_token_merges(MERGES)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_add_bos_token(False)
