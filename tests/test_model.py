"""The sharded model equals transformers at TP 1, 2 and 4, through the paged KV cache."""

from __future__ import annotations

import pytest
import torch
from checkpoints import SMALL, VARIANTS, build, greedy, reference
from ranks import run_ranks

from tp_engine.model.attention import AttentionMetadata
from tp_engine.model.loader import load_model
from tp_engine.model.parallel import TensorParallel

BLOCK = 4
PROMPTS = [[5, 17, 33, 2, 9, 41, 11, 3, 60, 7, 21, 12], [8, 1, 44, 19, 23]]
DECODE_STEPS = 4
GREEDY_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: build(name, root) for name in VARIANTS}


class PagedRun:
    """Feeds sequences through the paged cache the way the engine's scheduler does."""

    def __init__(self, model, tp: TensorParallel, num_seqs: int):
        cfg = model.config
        kv_heads = model.model.layers[0].self_attn.num_kv_heads
        self.caches = [torch.zeros(2, kv_heads, 64 * BLOCK, cfg.head_dim)
                       for _ in range(cfg.num_layers)]
        # interleaved block tables, so a sequence's blocks are not contiguous
        self.tables = [[b * num_seqs + s for b in range(16)] for s in range(num_seqs)]
        self.model, self.window = model, cfg.sliding_window

    def step(self, seqs: list[int], starts: list[int], tokens: list[list[int]]):
        meta = AttentionMetadata.build(starts, [len(t) for t in tokens],
                                       [self.tables[s] for s in seqs], BLOCK, self.window)
        ids = torch.tensor([t for ts in tokens for t in ts])
        pos = torch.cat([torch.arange(s, s + len(t)) for s, t in zip(starts, tokens)])
        with torch.no_grad():
            return self.model.compute_logits(self.model(ids, pos, self.caches, meta))


def run_variants(tp: TensorParallel, paths: dict) -> dict:
    results = {}
    for name, path in paths.items():
        model = load_model(path, tp, torch.float32)
        run = PagedRun(model, tp, len(PROMPTS))
        # a mixed step: sequence 0's prefill beside sequence 1's first chunk of 3 tokens
        first = run.step([0, 1], [0, 0], [PROMPTS[0], PROMPTS[1][:3]])
        rest = run.step([1], [3], [PROMPTS[1][3:]])
        decoded, seq = [], [list(p) for p in PROMPTS]
        for _ in range(DECODE_STEPS):  # decode both sequences in one step, feeding argmax
            nxt = [int(seq[i][-1] * 7 % 50) for i in range(2)]
            logits = run.step([0, 1], [len(s) for s in seq], [[t] for t in nxt])
            for i in range(2):
                seq[i].append(nxt[i])
            decoded.append(logits)
        greedy = PagedRun(model, tp, 1)
        tokens = list(PROMPTS[0])
        logits = greedy.step([0], [0], [tokens])
        for _ in range(GREEDY_TOKENS):
            if logits is not None:
                next_token = int(logits[-1].argmax())
            else:
                next_token = 0
            token = torch.tensor([next_token])
            if tp.size > 1:  # rank 0 samples; the others follow, as in the engine
                torch.distributed.broadcast(token, src=0)
            tokens.append(int(token))
            logits = greedy.step([0], [len(tokens) - 1], [[tokens[-1]]])
        results[name] = dict(first=first, rest=rest, decoded=decoded, seqs=seq,
                             greedy=tokens[len(PROMPTS[0]):])
    return results


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_and_greedy_match_transformers(checkpoints, tp):
    assert_match_transformers(run_ranks(tp, run_variants, checkpoints), checkpoints)


# sizes no TP size of the tests divides evenly: 9 heads over 3 KV heads (SmolLM2's shape),
# 6 heads over 2; MLP widths of 100 and 90
UNEVEN = {"9 heads": ("llama", dict(num_attention_heads=9, num_key_value_heads=3,
                                    hidden_size=72, intermediate_size=100)),
          "6 heads": ("qwen2", dict(num_attention_heads=6, num_key_value_heads=2,
                                    hidden_size=48, intermediate_size=90))}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return {name: build(variant, tmp_path_factory.mktemp(variant), **shape)
            for name, (variant, shape) in UNEVEN.items()}


def variants_and_shares(tp: TensorParallel, paths: dict) -> tuple[dict, list[int]]:
    """run_variants, and each rank's parameter bytes for the (one) checkpoint: one set of
    ranks for both."""
    return run_variants(tp, paths), parameter_bytes(tp, next(iter(paths.values())))


@pytest.mark.parametrize("tp, name", [(2, "9 heads"), (3, "9 heads"), (4, "6 heads")])
def test_uneven_tensor_parallel_matches_transformers(uneven, tp, name):
    """Heads, KV heads and the MLP shard as evenly as possible; a KV head whose query heads
    two ranks share is held by both (at TP 2 on 9 heads, rank 0's heads 0-4 use KV heads 0
    and 1 unevenly). An uneven shard differs from an exact 1/TP by at most, in every layer,
    one query head, one KV head (the one two ranks share) and one MLP row, plus the
    vocabulary's padding."""
    paths = {name: uneven[name]}
    results, per_rank = run_ranks(tp, variants_and_shares, paths)
    assert_match_transformers(results, paths)
    whole = parameter_bytes(TensorParallel(0, 1), uneven[name])[0]
    shape = {**SMALL, **UNEVEN[name][1]}
    hidden, dim = shape["hidden_size"], shape["hidden_size"] // shape["num_attention_heads"]
    per_layer = (2 * hidden * dim + dim) + 2 * (hidden * dim + dim) + 3 * hidden
    slack = 4 * (shape["num_hidden_layers"] * per_layer + 2 * hidden)
    assert len(per_rank) == tp
    for share in per_rank:
        assert abs(share - whole / tp) <= slack, (per_rank, whole, slack)


def assert_match_transformers(results: dict, paths: dict) -> None:
    for name, path in paths.items():
        ref = reference(path)
        got = results[name]
        with torch.no_grad():
            ref0 = ref(torch.tensor([got["seqs"][0]])).logits[0]
            ref1 = ref(torch.tensor([got["seqs"][1]])).logits[0]
        n0, n1 = len(PROMPTS[0]), len(PROMPTS[1])
        torch.testing.assert_close(got["first"][:n0], ref0[:n0], atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(got["first"][n0:], ref1[:3], atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(got["rest"], ref1[3:n1], atol=1e-4, rtol=0, msg=name)
        for step, logits in enumerate(got["decoded"]):
            expect = torch.stack([ref0[n0 + step], ref1[n1 + step]])
            torch.testing.assert_close(logits, expect, atol=1e-4, rtol=0,
                                       msg=f"{name} decode step {step}")
        assert got["greedy"] == greedy(ref, PROMPTS[0], GREEDY_TOKENS), name


def parameter_bytes(tp: TensorParallel, path) -> list[int]:
    model = load_model(path, tp, torch.float32)
    sharded = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if "norm" not in n)
    counts = torch.tensor([sharded])
    if tp.size > 1:
        parts = [torch.zeros_like(counts) for _ in range(tp.size)]
        torch.distributed.all_gather(parts, counts)
        return [int(p) for p in parts]
    return [int(counts)]


def test_each_rank_holds_its_share(checkpoints):
    whole = parameter_bytes(TensorParallel(0, 1), checkpoints["mistral"])[0]
    per_rank = run_ranks(2, parameter_bytes, checkpoints["mistral"])
    for share in per_rank:
        # only the vocabulary's padding row makes a shard larger than an exact half
        assert abs(share - whole / 2) <= 64 * 4 * 2, (share, whole)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_prefill_longer_than_a_linear_piece_matches_transformers(checkpoints, name):
    """2,400 rows in one step: on a CPU the packed linear goes through them in pieces (2,048,
    256 and 96 rows) and the MLP piece by piece; every row's logits stay transformers'."""
    model = load_model(checkpoints[name], TensorParallel(), torch.float32)
    if model.model.layers[0].mlp.gate_up_proj.packed is None:
        pytest.skip("oneDNN's packed linear is not available in this torch build")
    gen = torch.Generator().manual_seed(5)
    seqs, length, vocab = 12, 200, model.config.vocab_size
    prompts = torch.randint(0, vocab, (seqs, length), generator=gen)
    per_seq = -(-length // BLOCK)
    kv_heads = model.model.layers[0].self_attn.num_kv_heads
    caches = [torch.zeros(2, kv_heads, seqs * per_seq * BLOCK, model.config.head_dim)
              for _ in range(model.config.num_layers)]
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(seqs)]
    meta = AttentionMetadata.build([0] * seqs, [length] * seqs, tables, BLOCK)
    with torch.no_grad():
        logits = model.compute_logits(model(prompts.flatten(), meta.positions, caches, meta))
        want = reference(checkpoints[name])(prompts).logits
    torch.testing.assert_close(logits, want.flatten(0, 1), atol=1e-4, rtol=0)
