"""The faults of the README's fault table not covered elsewhere: a corrupt checkpoint, a
prompt larger than the whole KV cache, and a full disk under a batch job's output."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import time

import psutil
import pytest
from conftest import snapshot
from test_batch import ENV, batch_cmd, results, write_input

from tp_engine import Engine, SamplingParams
from tp_engine.errors import EngineError, InvalidRequestError


@pytest.fixture(scope="module")
def warm(tiny_model):
    Engine(tiny_model, device="cpu").terminate()  # the forkserver exists from here on
    return tiny_model


def settled(before: dict) -> dict:
    for _ in range(50):
        now = snapshot()
        if now == before:
            break
        time.sleep(0.02)
    return now


def test_a_corrupt_checkpoint_fails_clearly_and_leaves_nothing(warm, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(warm, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot()
    with pytest.raises(EngineError, match=r"rank \d.*failed to load") as error:
        Engine(str(broken), tensor_parallel_size=2, device="cpu")
    assert "safetensors" in str(error.value).lower() or "model.safetensors" in str(error.value)
    assert settled(before) == before


def test_a_prompt_larger_than_the_kv_cache_is_refused(warm):
    with Engine(warm, tensor_parallel_size=2, device="cpu", num_kv_blocks=4,
                block_size=16) as engine:
        with pytest.raises(InvalidRequestError, match="KV cache"):
            engine.generate({"prompt_token_ids": [7] * 100}, SamplingParams(max_tokens=4))
        # a request that outgrows the cache while decoding ends with "length", alone
        out = engine.generate({"prompt_token_ids": [7] * 40},
                              SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))[0]
        assert out.finish_reason == "length" and 0 < len(out.token_ids) < 200
        assert engine.generate("still serving", SamplingParams(max_tokens=2))[0].token_ids


def small_disk() -> None:
    """A disk that fills after 6 KiB of output: writes past it fail with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (6 * 1024, 6 * 1024))


@pytest.mark.timeout(120)
def test_a_full_disk_stops_the_batch_cleanly_and_a_rerun_finishes(warm, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 30)
    out = tmp_path / "out.jsonl"
    job = subprocess.Popen(batch_cmd(warm, inp, out, "--tp", "2"), env=ENV,
                           preexec_fn=small_disk, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    tree = [job.pid]
    try:
        tree += [p.pid for p in psutil.Process(job.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    _, err = job.communicate(timeout=90)
    assert job.returncode == 1, err
    assert f"cannot write {out}" in err and "File too large" in err
    time.sleep(0.5)
    assert not [p for p in tree if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    partial = out.read_text()
    assert 0 < len(partial.encode()) <= 6 * 1024
    subprocess.run(batch_cmd(warm, inp, out, "--tp", "2"), env=ENV, check=True, timeout=90,
                   capture_output=True)
    done = results(out)
    assert len(done) == 32 and sorted(json.loads(x)["custom_id"] or "" for x in
                                      out.read_text().splitlines()).count("r0") == 1
