"""A soak run: random requests, random aborts, client threads coming and going; then threads,
file descriptors and memory are flat and every request is accounted for. This is the harness
of `tp-engine bench soak`, run once in the suite. The full run (5,000 requests) is slow and
off by default: TP_ENGINE_SOAK=5000 turns it on."""

from __future__ import annotations

import os

import pytest

from tp_engine import Engine
from tp_engine.bench.soak import soak

FULL = int(os.environ.get("TP_ENGINE_SOAK", "0"))


def run(model: str, requests: int) -> None:
    with Engine(model, tensor_parallel_size=2, device="cpu", max_num_seqs=32) as engine:
        soak(engine, 64, threads=4, per_thread=8, seed=1)  # warm: allocator caches, threads
        report = soak(engine, requests, threads=8, per_thread=25, seed=2)
        print("\n".join(report.lines()))
        assert not report.errors, report.errors[:5]
        assert report.requests == requests
        assert report.completed + report.aborted == requests
        assert report.after["threads"] == report.before["threads"]
        assert report.after["fds"] == report.before["fds"]
        # RSS may settle a little higher after warm-up; a leak per request would not fit here
        growth = report.after["rss_bytes"] - report.before["rss_bytes"]
        assert growth < 64 << 20, f"RSS grew by {growth >> 20} MiB"
        stats = engine.core.stats()
        assert stats["running"] == stats["waiting"] == stats["in_flight"] == 0
        assert stats["kv_blocks_free"] == stats["kv_blocks"]  # cached prefixes included
        assert stats["prefix_cache_hits"] > 0
        for replica in engine.core.replicas:  # no block held, each hash where it should be
            replica.blocks.check()


@pytest.mark.timeout(120)
def test_short_soak(tiny_model):
    run(tiny_model, 300)


@pytest.mark.skipif(not FULL, reason="the full soak is slow: set TP_ENGINE_SOAK=5000")
@pytest.mark.timeout(3600)
def test_full_soak(tiny_model):
    run(tiny_model, FULL)
