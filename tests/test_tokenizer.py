"""Tokenizer, incremental detokenizer and tiny checkpoint, checked against transformers."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

from tp_engine.checkpoints.tiny import make_tiny_model
from tp_engine.engine.detokenizer import IncrementalDetokenizer
from tp_engine.engine.tokenizer import Tokenizer
from tp_engine.errors import InvalidRequestError

ARCHS = ["llama", "mistral", "qwen2"]
# Character pools that cover 1-, 2-, 3- and 4-byte UTF-8 sequences.
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    " \n\t.,;:!?'\"()-_/<>|{}",
    "éèêëàâäçñöüßÉÀÇÑøåæœ",
    "αβγδεζλμπσωжзийклмн",
    "的一是不了人我在有他这中大来上国个到说们日本語中文测试",
    "안녕하세요세계",
    "😀😂🥲👍🚀🎉🔥💡👩‍💻🇫🇷",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And in 日本語? 🤔"},
    ],
    [{"role": "user", "content": "  spaces\n\nand <|im_end|> inside  "}],
]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(rng.choice(POOLS)) for _ in range(n))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch=arch, hidden_size=64) for arch in ARCHS}


@pytest.fixture(scope="session")
def toks(model_dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {arch: Tokenizer.from_dir(d) for arch, d in model_dirs.items()}


@pytest.fixture(scope="session")
def hf_toks(model_dirs: dict[str, Path]) -> dict:
    transformers = pytest.importorskip("transformers")
    return {arch: transformers.AutoTokenizer.from_pretrained(d) for arch, d in model_dirs.items()}


@pytest.mark.parametrize("vocab_size", [8003, 1000, 260])
def test_vocab_size_exact(tmp_path: Path, vocab_size: int) -> None:
    d = make_tiny_model(tmp_path, vocab_size=vocab_size, hidden_size=32, num_layers=1)
    tok = Tokenizer.from_dir(d)
    assert tok.vocab_size == vocab_size
    assert json.loads((d / "config.json").read_text())["vocab_size"] == vocab_size
    assert sorted(HFTokenizer.from_file(str(d / "tokenizer.json")).get_vocab().values()) == list(
        range(vocab_size)
    )
    assert [tok.id_to_token(i) for i in range(4)] == ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def test_special_ids(toks: dict[str, Tokenizer]) -> None:
    for tok in toks.values():
        assert tok.bos_token_id == 0
        assert tok.eos_token_ids == [1, 3]  # generation_config's list, tokenizer eos deduplicated
    assert toks["llama"].encode("hi")[0] == 0
    assert toks["qwen2"].encode("hi")[0] != 0
    assert toks["llama"].encode("hi", add_special_tokens=False) == toks["qwen2"].encode("hi", False)


@pytest.mark.parametrize("arch", ARCHS)
def test_unicode_round_trip(toks: dict[str, Tokenizer], hf_toks: dict, arch: str) -> None:
    tok, rng = toks[arch], random.Random(arch)
    for _ in range(50):
        text = random_text(rng, rng.randint(1, 60))
        if arch == "qwen2":  # Qwen2's pipeline NFC-normalizes, as in the real model
            text = unicodedata.normalize("NFC", text)
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert ids == hf_toks[arch](text)["input_ids"]


def feed(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    return deltas


@pytest.mark.parametrize("arch", ARCHS)
def test_detokenizer_matches_decode(toks: dict[str, Tokenizer], arch: str) -> None:
    tok, rng = toks[arch], random.Random(1)
    split_chars = 0
    for _ in range(40):
        text = unicodedata.normalize("NFC", random_text(rng, rng.randint(1, 80)))
        ids = tok.encode(text, add_special_tokens=False)
        split_chars += sum("\ufffd" in tok.decode([i]) for i in ids)
        one = IncrementalDetokenizer(tok)
        deltas = [one.add([i]) for i in ids]
        chunked = IncrementalDetokenizer(tok)
        chunk_deltas = feed(chunked, ids, rng)
        for d in (deltas, chunk_deltas):
            assert not any("\ufffd" in x for x in d)
            assert "".join(d) == tok.decode(ids) == text
        assert one.flush() == "" and one.text == text == chunked.text
    assert split_chars > 20  # the test really exercises characters split across tokens


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_special_tokens(toks: dict[str, Tokenizer], skip: bool) -> None:
    tok = toks["llama"]
    ids = [0, *tok.encode(" héllo 😀 wörld", False), 3, 2, *tok.encode("日本 ok", False), 1]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    out = "".join(detok.add([i]) for i in ids)
    assert out == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in out) is not skip


def test_detokenizer_flushes_incomplete_character(toks: dict[str, Tokenizer]) -> None:
    tok = toks["llama"]
    ids = tok.encode("ok 🚀", add_special_tokens=False)[:-1]  # drop the emoji's last byte
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.add([i]) for i in ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tok.decode(ids)
    assert tok.decode(ids).endswith("\ufffd")


def test_detokenizer_cost_is_bounded(toks: dict[str, Tokenizer]) -> None:
    tok, longest = toks["llama"], 0
    real_decode = tok.decode

    class Spy(Tokenizer):
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            nonlocal longest
            longest = max(longest, len(ids))
            return real_decode(ids, skip_special_tokens)

    spy = Spy.__new__(Spy)
    spy.__dict__.update(tok.__dict__)
    ids = tok.encode(random_text(random.Random(2), 3000), add_special_tokens=False)
    detok = IncrementalDetokenizer(spy)
    assert "".join(detok.add([i]) for i in ids) == tok.decode(ids)
    assert len(ids) > 1000 and longest <= 8


def test_detokenizer_sentencepiece_leading_space() -> None:
    """Llama-2 style decoder that strips the first token's space and uses byte fallback."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t in ["▁", *letters, *(f"▁{c}" for c in letters), "▁h", "▁he", "ll", "▁hell", "▁hello"]:
        vocab.setdefault(t, len(vocab))
    merges = [("▁", c) for c in letters] + [("▁h", "e"), ("l", "l"), ("▁he", "ll"), ("▁hell", "o")]
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1),
        ]
    )
    tok = Tokenizer(hf)
    for text in ["hello world", "hello wörld 日本 😀 ok", "a  b"]:
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.add([i]) for i in ids]
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == tok.decode(ids) == text


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_matches_transformers(
    toks: dict[str, Tokenizer], hf_toks: dict, arch: str
) -> None:
    tok, hf = toks[arch], hf_toks[arch]
    for msgs in CONVERSATIONS:
        ours = tok.apply_chat_template(msgs, add_generation_prompt=True)
        theirs = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours == theirs
        assert ours.endswith("<|im_start|>assistant\n")
        hf_ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
        assert tok.encode(ours, add_special_tokens=False) == list(hf_ids)


FANCY_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{%- for m in messages %}
  {%- if m['role'] not in ['system', 'user', 'assistant'] %}
    {{- raise_exception('bad role ' + m['role']) }}
  {%- endif %}
  {%- if m['role'] == 'system' %}{% continue %}{% endif %}
  {%- set ns.n = ns.n + 1 %}
  {%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}
  {%- else %}[{{ ns.n }}] {{ m | tojson }}
  {% endif %}
{%- endfor %}
{%- if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{{ strftime_now('%Y') }}{% if add_generation_prompt %}>>{{ eos_token }}{% endif %}"""


def test_chat_template_features_match_transformers(
    toks: dict[str, Tokenizer], hf_toks: dict
) -> None:
    tok, hf = toks["llama"], hf_toks["llama"]
    tools = [{"name": "f", "description": "<é>", "parameters": {}}]
    msgs = [*CONVERSATIONS[1], {"role": "assistant", "content": None, "reasoning": "r"}]
    kwargs = {"add_generation_prompt": True, "tools": tools}
    ours = Tokenizer(tok._tok, tok.special_tokens, FANCY_TEMPLATE).apply_chat_template(
        msgs, **kwargs
    )
    theirs = hf.apply_chat_template(msgs, chat_template=FANCY_TEMPLATE, tokenize=False, **kwargs)
    assert ours == theirs and '"<é>"' in ours


def test_chat_template_errors(toks: dict[str, Tokenizer]) -> None:
    tok = toks["llama"]
    bad = Tokenizer(tok._tok, tok.special_tokens, FANCY_TEMPLATE)
    with pytest.raises(InvalidRequestError, match="bad role"):
        bad.apply_chat_template([{"role": "tool", "content": "x"}])
    for msgs in ([], "hi", [{"content": "no role"}], ["not a dict"]):
        with pytest.raises(InvalidRequestError):
            tok.apply_chat_template(msgs)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):  # content missing -> undefined in template
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer(tok._tok).apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_tiny_model(model_dirs: dict[str, Path], arch: str) -> None:
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dirs[arch], output_loading_info=True
    )
    assert (
        type(model).__name__
        == {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[arch] + "ForCausalLM"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 6, 7, 8]])).logits
    assert logits.shape == (1, 5, 8003) and torch.isfinite(logits).all()
    with safe_open(str(model_dirs[arch] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) is (arch != "qwen2")
    assert ("model.layers.0.self_attn.q_proj.bias" in keys) is (arch == "qwen2")


def test_tiny_model_seed_and_dtype(tmp_path: Path) -> None:
    def load(d: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    small = {"hidden_size": 32, "num_layers": 1, "vocab_size": 300}
    a = load(make_tiny_model(tmp_path / "a", seed=1, **small))
    b = load(make_tiny_model(tmp_path / "b", seed=1, **small))
    c = load(make_tiny_model(tmp_path / "c", seed=2, dtype="bfloat16", **small))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"].float())
    assert {t.dtype for t in c.values()} == {torch.bfloat16}
    assert torch.equal(a["model.norm.weight"], torch.ones(32))
