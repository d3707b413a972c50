"""Shared fixtures: tiny checkpoints (random, built once per session) and process hygiene."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import psutil
import pytest

from tp_engine.checkpoints.tiny import make_tiny_model, write_tokenizer
from tp_engine.wire import ipc_base, remove_stale_ipc_dirs

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512,
            intermediate_size=128, max_position_embeddings=512)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small random Llama with a real tokenizer, written by tp-engine itself."""
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", **TINY))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Checkpoints written by transformers (with a tokenizer added): a Llama with one KV head
    (replicated at TP 2 and 4) and a Qwen2 with tied embeddings and q/k/v biases."""
    from checkpoints import build

    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for name, arch in (("llama", "llama"), ("qwen2", "qwen2")):
        path = build(name, root, vocab_size=300)
        write_tokenizer(path, arch, 300, 256)
        paths[name] = str(path)
    return paths


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot() -> dict:
    """What an engine must give back: child processes, threads, open files."""
    me = psutil.Process()
    return dict(children={p.pid for p in me.children(recursive=True)},
                threads=threading.active_count(), fds=len(os.listdir("/proc/self/fd")))


def live_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def is_multiprocessing_helper(proc: psutil.Process) -> bool:
    """The forkserver and the resource tracker: one each per process, not per engine."""
    cmd = " ".join(proc.cmdline())
    return "multiprocessing.forkserver" in cmd or "multiprocessing.resource_tracker" in cmd


@pytest.fixture(autouse=True, scope="session")
def no_worker_left_behind():
    """After the suite: no worker process, and no IPC directory of ours in the temp dir."""
    ours = set(Path(ipc_base()).glob("tp-engine-*"))
    yield
    remove_stale_ipc_dirs()  # what the next engine start does: the SIGKILL tests leave some
    # what remains is this process's own, or another live process's (not ours to judge)
    mine = f"tp-engine-{os.getpid()}-"
    left = {p for p in set(Path(ipc_base()).glob("tp-engine-*")) - ours
            if p.name.startswith(mine)}
    assert not left, f"IPC directories left behind: {sorted(map(str, left))}"
    # the forkserver and multiprocessing's resource tracker live as long as this process
    workers = [p for p in live_children() if not is_multiprocessing_helper(p)]
    for p in workers:
        p.kill()
    assert not workers, f"processes left after the suite: {[p.pid for p in workers]}"
