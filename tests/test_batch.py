"""Batch jobs: exactly once across SIGKILLs, the same outputs under torchrun (one node and
two), and SIGTERM (preemption) under torchrun keeps what finished."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ranks import free_port

from tp_engine.batch import EXIT_PREEMPTED, read_done

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.fixture(autouse=True, scope="module")
def _job_temp_dir(tmp_path_factory):
    """The jobs' temp directory: torchrun's log directories, and what multiprocessing leaves
    of a job killed with SIGKILL, go to the session's temp tree instead of /tmp."""
    ENV["TMPDIR"] = str(tmp_path_factory.mktemp("jobs-tmp"))


def write_input(path: Path, n: int, max_tokens: int = 12) -> Path:
    with path.open("w") as f:
        for i in range(n):
            if i % 2:
                url, body = "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": f"question {i}"}]}
            else:
                url, body = "/v1/completions", {"prompt": f"prompt number {i}"}
            body.update(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url,
                                "body": body}) + "\n")
        f.write("this line is not json\n")
        f.write(json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/completions",
                            "body": {"prompt": "x", "temperature": -1}}) + "\n")
    return path


def batch_cmd(model: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tp_engine", "batch", model, "--device", "cpu", "-i",
            str(inp), "-o", str(out), "--no-progress", *extra]


def torchrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "tp_engine"]


def results(path: Path) -> dict:
    """custom_id (or the bad line's number) -> what it produced."""
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        key = record["custom_id"] or f"line {record['error']['line']}"
        assert key not in out, f"{key} appears twice"
        if record["response"]:
            choice = record["response"]["body"]["choices"][0]
            out[key] = choice.get("text", (choice.get("message") or {}).get("content"))
        else:
            out[key] = ("error", record["error"]["code"])
    return out


def leftover_parts(out: Path) -> list[str]:
    """What a data-parallel job left beside its output: part files, marks."""
    return sorted(p.name for p in out.parent.glob(out.name + ".*"))


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    inp = write_input(root / "in.jsonl", 60, max_tokens=24)
    out = root / "reference.jsonl"
    subprocess.run(batch_cmd(tiny_model, inp, out, "--tp", "2"), check=True, env=ENV,
                   timeout=90)
    return inp, results(out)


def test_bad_lines_get_error_records_and_the_rest_completes(reference):
    _, expect = reference
    assert len(expect) == 62
    assert expect["line 61"] == ("error", "invalid_request")
    assert expect["bad"] == ("error", "invalid_request")
    assert all(isinstance(expect[f"r{i}"], str) for i in range(60))


@pytest.mark.timeout(180)
def test_sigkill_at_three_random_moments_then_rerun_gives_each_request_once(
        tiny_model, reference, tmp_path):
    inp, expect = reference
    out = tmp_path / "out.jsonl"
    rng = random.Random(7)
    for _ in range(3):
        size = out.stat().st_size if out.exists() else 0
        job = subprocess.Popen(batch_cmd(tiny_model, inp, out, "--tp", "2",
                                         "--max-in-flight", "2"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60  # until this run has written something
        while time.monotonic() < deadline and (out.stat().st_size if out.exists() else 0) \
                <= size + 45:  # more than the torn line left by the last kill
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        job.send_signal(signal.SIGKILL)
        job.wait()
        with out.open("ab") as f:  # a torn last line, as a kill in mid-write leaves
            f.write(b'{"id": "batch_req_torn", "custom_id": "r')
    done_before = len(read_done(out))
    subprocess.run(batch_cmd(tiny_model, inp, out, "--tp", "2"), check=True, env=ENV,
                   timeout=90)
    assert results(out) == expect
    assert done_before < len(expect)  # the kills did interrupt the job


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks,dp", [(2, 1), (4, 2)])
def test_torchrun_gives_the_spawned_engine_outputs(tiny_model, reference, tmp_path, ranks, dp):
    """2 ranks: one TP-2 model; 4 ranks with --dp 2: two replicas of TP 2, merged."""
    inp, expect = reference
    out = tmp_path / "out.jsonl"
    cmd = torchrun_cmd("--nproc-per-node", str(ranks), "--master-port", str(free_port()))
    job = subprocess.run([*cmd, *batch_cmd(tiny_model, inp, out, "--dp", str(dp))[3:]],
                         check=True, env=ENV, timeout=100, capture_output=True, text=True)
    assert results(out) == expect
    if dp > 1:
        assert "replica 1: batch done" in job.stderr
        assert "merged 2 parts: 62 records" in job.stderr
    assert not leftover_parts(out)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp", [1, 2])
def test_two_torchrun_nodes_on_loopback(tiny_model, reference, tmp_path, dp):
    """dp 1: one model across both nodes, and only rank 0 writes; dp 2: a replica of TP 2 on
    each node, each with its part file on the file system both see, merged by node 0."""
    inp, expect = reference
    out = tmp_path / "out.jsonl"
    elsewhere = tmp_path / "never.jsonl" if dp == 1 else out
    port = str(free_port())
    nodes = [subprocess.Popen(
        [*torchrun_cmd("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", str(dp),
                       "--master-addr", "127.0.0.1", "--master-port", port),
         *batch_cmd(tiny_model, inp, out if rank == 0 else elsewhere, "--dp", str(dp))[3:]],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for rank in (0, 1)]
    assert [n.wait(timeout=100) for n in nodes] == [0, 0]
    assert results(out) == expect
    assert not (tmp_path / "never.jsonl").exists()  # only rank 0 writes
    assert not leftover_parts(out)


@pytest.mark.timeout(150)
def test_sigterm_under_torchrun_keeps_what_finished_and_a_rerun_completes(
        tiny_model, reference, tmp_path):
    inp, expect = reference
    out = tmp_path / "out.jsonl"
    cmd = [*torchrun_cmd("--nproc-per-node", "2", "--master-port", str(free_port())),
           *batch_cmd(tiny_model, inp, out, "--max-in-flight", "2")[3:]]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.05)
    tree = [job.pid] + [p.pid for p in psutil.Process(job.pid).children(recursive=True)]
    job.send_signal(signal.SIGTERM)
    code = job.wait(timeout=60)
    time.sleep(0.5)
    assert not [pid for pid in tree if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert code != 0
    partial = results(out)
    assert 0 < len(partial) < len(expect)
    assert all(expect[k] == v for k, v in partial.items())
    subprocess.run(cmd, check=True, env=ENV, timeout=100, capture_output=True)
    assert results(out) == expect


@pytest.mark.timeout(90)
def test_sigterm_exits_with_the_preempted_code(tiny_model, reference, tmp_path):
    inp, expect = reference
    out = tmp_path / "out.jsonl"
    job = subprocess.Popen(batch_cmd(tiny_model, inp, out, "--tp", "2", "--max-in-flight", "2"),
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) == EXIT_PREEMPTED
    partial = results(out)
    assert 0 < len(partial) < len(expect)
    assert all(expect[k] == v for k, v in partial.items())


def request_line(custom_id: str, prompt: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"prompt": prompt, "max_tokens": 4, "temperature": 0, **body}}


# every kind of bad line, each to get one error record naming its line, on every rerun
EVERY_KIND_OF_LINE = [
    request_line("a", "first"),                                      # 1: a result
    "this line is not json",                                         # 2
    {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},  # 3: no custom_id
    {"custom_id": "c", "method": "POST", "url": "/v1/nowhere", "body": {}},  # 4: bad url
    [1, 2, 3],                                                       # 5: not an object
    request_line("a", "again"),                                      # 6: custom_id of line 1
    request_line("t", "x", temperature=-1),                          # 7: the engine refuses it
    "",                                                              # blank: not a line
    request_line("b", "last"),                                       # 9: a result
]


def record_identities(path: Path) -> list:
    """Each record as the input line it answers: an error by its line, a result by its id."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted((("line", r["error"]["line"]) if r["error"] else ("id", r["custom_id"])
                   for r in records), key=str)


@pytest.mark.timeout(120)
def test_a_rerun_records_every_bad_line_once(tiny_model, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                           for line in EVERY_KIND_OF_LINE))
    expect = sorted([("id", "a"), ("id", "b"), *(("line", n) for n in range(2, 8))], key=str)
    cmd = batch_cmd(tiny_model, inp, out)
    subprocess.run(cmd, check=True, env=ENV, timeout=60, capture_output=True)
    first = out.read_text()
    assert record_identities(out) == expect
    rerun = subprocess.run(cmd, check=True, env=ENV, timeout=60, capture_output=True, text=True)
    assert out.read_text() == first, "a rerun of a finished job must write nothing"
    assert "0 completed, 0 failed, 8 already done, of 8" in rerun.stderr
    # what a SIGKILL leaves: the first records written, then a torn line
    with out.open("wb") as f:
        f.write("".join(first.splitlines(keepends=True)[:4]).encode() + b'{"id": "batch_re')
    subprocess.run(cmd, check=True, env=ENV, timeout=60, capture_output=True)
    assert record_identities(out) == expect


@pytest.mark.timeout(150)
def test_sigkill_of_a_random_rank_of_two_replicas_then_rerun_gives_each_request_once(
        tiny_model, reference, tmp_path):
    inp, expect = reference
    out = tmp_path / "out.jsonl"
    rng = random.Random(11)
    cmd = [*torchrun_cmd("--nproc-per-node", "4", "--master-port", str(free_port())),
           *batch_cmd(tiny_model, inp, out, "--dp", "2", "--max-in-flight", "2")[3:]]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    parts = [tmp_path / f"out.jsonl.part-{i}-of-2" for i in range(2)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.exists() and p.stat().st_size
                                                  for p in parts):
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
             if "tp_engine" in " ".join(p.cmdline())]
    assert len(ranks) == 4
    rng.choice(ranks).kill()
    assert job.wait(timeout=60) != 0
    done_before = sum(len(read_done(p)) for p in parts if p.exists())
    assert 0 < done_before < len(expect) and not out.exists()
    subprocess.run([*cmd[:-2], "--max-in-flight", "64"], check=True, env=ENV, timeout=100,
                   capture_output=True)
    assert results(out) == expect
    assert not leftover_parts(out)
