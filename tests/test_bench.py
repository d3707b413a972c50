"""Every `tp-engine bench` mode runs end to end on a tiny configuration and prints its table
(but soak, whose harness tests/test_soak.py runs once, with more checks).

Smoke tests only: benchmarks are not timed tests, so no figure is asserted, only that each mode
ran, measured something and printed the table (and, for throughput, the baseline beside it).
The attention test guards the fast paths the benchmarks led to: split decode groups, split
prefill groups and mixed steps must compute what one padded group computes."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from tp_engine.cli import main

TINY_RUN = ["--device", "cpu", "--max-model-len", "256"]


def run_mode(capsys, *argv: str) -> str:
    assert main(["bench", *argv]) == 0
    return capsys.readouterr().out


def test_throughput(capsys, tiny_model):
    out = run_mode(capsys, "throughput", tiny_model, *TINY_RUN, "--requests", "4", "--runs", "1",
                   "--prompt-len", "4,12", "--output-len", "2,6", "--hf-batch-sizes", "2",
                   "--shared-prefix", "32", "--splits", "1x1,2x1")
    assert "### throughput" in out and "after a shared prefix of 32" in out
    rows = [line for line in out.splitlines() if line.startswith("| tp-engine ")]
    assert [row.split("|")[1].strip() for row in rows[:2]] == ["tp-engine TP=1",
                                                              "tp-engine DP=2 TP=1"]
    cells = [c.strip() for c in rows[0].split("|")]
    assert cells[6] not in ("0%", "-")  # 3 of 4 find the prefix
    assert float(cells[7]) > 0  # GFLOP/s achieved, and the share of the nominal peak
    assert cells[8].endswith("%") and "| peak (nominal) |" in out
    assert "transformers generate, batch 2" in out and "speed-up" in out
    assert "| torch |" in out and "| cores |" in out  # the machine is described


def test_latency(capsys, tiny_model):
    out = run_mode(capsys, "latency", tiny_model, *TINY_RUN, "--concurrency", "1,2",
                   "--requests-per-client", "1", "--prompt-len", "8", "--max-tokens", "4",
                   "--shared-prefix", "32")
    assert "### latency" in out and "TTFT median ms" in out
    for side in ("on", "off"):
        assert out.count(f"\n| 1 (cache {side}) |") == 1
        assert out.count(f"\n| 2 (cache {side}) |") == 1
    assert "\n| 1 (cache on) | 1 | " in out and "| 100% |" not in out  # the last block: computed
    assert out.count("| 0% |") == 2  # the cache off
    assert "| 1 (transformers generate) |" in out


def test_lifecycle(tiny_model):
    """Run as a user runs it, in a process of its own, whose stderr holds what the workers
    print too: the failure messages of its deliberate kills must not reach it."""
    done = subprocess.run([sys.executable, "-m", "tp_engine", "bench", "lifecycle", tiny_model,
                           *TINY_RUN, "--runs", "1", "--process-runs", "1", "--in-flight", "4"],
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "### lifecycle, TP=2" in out
    for step in ("ready, cold", "a later engine", "terminate(), idle", "in flight",
                 "WorkerDiedError", "no worker left"):
        assert step in out, step
    assert "inf" not in out  # every death was detected
    for alarm in ("engine failed", "died (killed by signal", "failed step", "Connection reset"):
        assert alarm not in done.stderr, done.stderr


def test_overhead(capsys, tiny_model):
    out = run_mode(capsys, "overhead", tiny_model, *TINY_RUN, "--batch-sizes", "1,3",
                   "--steps", "2,6", "--runs", "1", "--prompt-len", "8")
    assert "### control-plane cost per decode step" in out and "its 90% interval" in out
    assert "\n| 1 |" in out and "\n| 3 |" in out


def test_memory(capsys, tiny_model):
    out = run_mode(capsys, "memory", tiny_model, *TINY_RUN, "--sizes", "1,2", "--requests", "2")
    assert "### memory per rank" in out
    assert out.count("| controller |") == 2 and "\n| 2 | 1 |" in out


@pytest.mark.parametrize("seed", range(3))
def test_attention_fast_paths_agree(seed, monkeypatch):
    """Random mixed steps through the grouped attention, split as often as possible and
    reading shared leading blocks once, equal the same steps computed as one group each for
    decodes and prefills, every block gathered per sequence."""
    import tp_engine.model.attention_groups as meta_module
    from tp_engine.model.attention import AttentionMetadata, paged_attention

    rng = random.Random(seed)
    torch.manual_seed(seed)
    bs, kv, group, dim, blocks = 4, 2, 3, 8, 300
    for _ in range(20):
        n = rng.randint(1, 10)
        free = rng.sample(range(blocks), blocks)
        share = rng.choice([0, 1, 3])  # leading blocks of every table, before every start
        prefix = [free.pop() for _ in range(share)]
        starts = [rng.randint(share * bs, 40) for _ in range(n)]
        lens = [1 if rng.random() < 0.6 else rng.randint(2, 20) for _ in range(n)]
        tables = [prefix + [free.pop() for _ in range(-(-(s + q) // bs) - share)]
                  for s, q in zip(starts, lens)]
        tokens = sum(lens)
        q = torch.randn(tokens, kv * group, dim)
        k, v = torch.randn(tokens, kv, dim), torch.randn(tokens, kv, dim)
        cache = torch.randn(2, kv, blocks * bs, dim)
        window = rng.choice([None, 7])
        results = []
        for saving in (10**9, 1):  # never split, then split wherever possible
            monkeypatch.setattr(meta_module, "MIN_SAVING_BLOCKS", saving)
            monkeypatch.setattr(meta_module, "MIN_SAVING_ROWS", saving)
            meta = AttentionMetadata.build(starts, lens, tables, bs, window)
            results.append(paged_attention(q, k, v, cache.clone(), meta, 0.3))
        torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(2))
def test_a_decode_run_reads_shared_blocks_once_and_computes_the_same(seed, monkeypatch):
    """Every step of a run of decode steps over sequences that share their first blocks
    (some ending early, so the run cuts its groups) equals the run gathered per sequence."""
    import tp_engine.model.attention_groups as meta_module
    from tp_engine.model.attention import paged_attention
    from tp_engine.model.decode_run import DecodeRun

    rng = random.Random(seed)
    torch.manual_seed(seed)
    bs, kv, group, dim, blocks, share = 4, 2, 3, 8, 400, 5
    n = rng.randint(2, 9)
    free = rng.sample(range(blocks), blocks)
    prefix = [free.pop() for _ in range(share)]
    starts = [rng.randint(share * bs, share * bs + 30) for _ in range(n)]
    steps = sorted((rng.randint(1, 9) for _ in range(n)), reverse=True)
    tables = [prefix + [free.pop() for _ in range((s + k - 1) // bs + 1 - share)]
              for s, k in zip(starts, steps)]
    cache = torch.randn(2, kv, blocks * bs, dim)
    results, shared = [], []
    for saving in (10**9, 1):
        monkeypatch.setattr(meta_module, "MIN_SAVING_BLOCKS", saving)
        run = DecodeRun.build(starts, steps, tables, bs, None, kv, torch.float32)
        shared.append(max(g.shared for g in run.groups))
        torch.manual_seed(seed)
        outs, written = [], cache.clone()
        for step in range(len(run)):
            m = run.running[step]
            q = torch.randn(m, kv * group, dim)
            k, v = torch.randn(m, kv, dim), torch.randn(m, kv, dim)
            outs.append(paged_attention(q, k, v, written, run.metadata(step), 0.3))
        results.append(outs)
    assert shared == [0, share]
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
