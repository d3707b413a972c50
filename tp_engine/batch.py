"""`tp-engine batch`: the OpenAI Batch API's JSONL through the engine, exactly once.

Input is streamed line by line; at most `--max-in-flight` requests are in the engine; each
result is appended as one line and flushed as soon as it finishes. Rerunning with the same
output file resumes: the lines already there are skipped (a torn last line, from a kill in
mid-write, is cut off first), so a job killed at any moment and rerun ends with every input
line recorded exactly once, errors included. A result is known by its `custom_id`; an error
record carries its input line's number (`error.line`, as in OpenAI's batch errors), and that
is how a rerun knows it, since a line that failed may have no usable `custom_id` (not JSON,
none given, or one an earlier line already uses). SIGTERM (Slurm preemption) stops admitting,
keeps what finished, aborts the rest and exits with EXIT_PREEMPTED so that the scheduler
requeues it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tp_engine.errors import EngineError, InvalidRequestError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", what a requeue wants to see
URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class BatchSummary:
    total: int = 0
    skipped: int = 0
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    preempted: bool = False
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        rate = self.output_tokens / self.seconds if self.seconds else 0.0
        state = "preempted" if self.preempted else "done"
        return (f"batch {state}: {self.completed} completed, {self.failed} failed, "
                f"{self.skipped} already done, of {self.total}; {self.output_tokens} output "
                f"tokens in {self.seconds:.1f} s ({rate:.0f} tokens/s)")


def read_done(output: Path) -> set[str]:
    """The keys already in `output`, after cutting a torn last line."""
    if not output.exists():
        return set()
    done: set[str] = set()
    good = 0
    with output.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except ValueError:
                break
            done.add(record_key(record))
            good += len(raw)
    if good != output.stat().st_size:
        with output.open("r+b") as f:
            f.truncate(good)
    return done


def record_key(record: dict[str, Any]) -> str:
    """What a record in the output stands for: an error its input line, a result its
    request. The loop in run_batch keys input lines the same way (line_key, id_key)."""
    line = (record.get("error") or {}).get("line")
    if line is not None:
        return line_key(line)
    return id_key(record.get("custom_id"))


def line_key(number: int) -> str:
    return f"line:{number}"


def custom_id_of(request: Any) -> Any:
    """An input line's custom_id, None where it has none (or is not an object)."""
    return request.get("custom_id") if isinstance(request, dict) else None


def id_key(custom_id: Any) -> str:
    # JSON, not str(): the custom_ids "1" and 1 (or "True" and true) are different requests
    return "id:" + json.dumps(custom_id, sort_keys=True)


def read_requests(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, request or None, error or None) for each non-blank line, streamed."""
    with path.open("r", encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                request = json.loads(text)
            except ValueError as e:
                yield number, None, f"line {number} is not JSON: {e}"
                continue
            yield number, request, check_request(request)


def check_request(request: Any) -> str | None:
    if not isinstance(request, dict):
        return "a request must be a JSON object"
    if request.get("custom_id") is None:
        return "custom_id is missing"
    if request.get("url") not in URLS:
        return f"url must be one of {URLS}, got {request.get('url')!r}"
    if request.get("method", "POST") != "POST":
        return "method must be POST"
    if not isinstance(request.get("body"), dict):
        return "body must be a JSON object"
    return None


def result_record(custom_id: Any, response: Any) -> dict[str, Any]:
    body = response.to_dict()
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": body["id"], "body": body},
            "error": None}


def error_record(custom_id: Any, code: str, message: str, line: int) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id,
            "response": None, "error": {"code": code, "message": message, "line": line}}


class Writer:
    """Appends whole lines with one unbuffered write each, so a kill tears at most one."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


async def run_batch(engine, input_path: Path, output_path: Path, max_in_flight: int = 64,
                    progress: bool = True, share: tuple[int, int] = (0, 1)) -> BatchSummary:
    """`share`: (this replica, replicas) of a job split among data-parallel replicas, which
    serves only its lines, into its own part file (tp_engine/batch_parts)."""
    from tp_engine.batch_parts import owner, part_path

    index, replicas = share
    summary = BatchSummary()
    done = read_done(output_path)  # with replicas, what a merge or a single run left there
    if replicas > 1:
        output_path = part_path(output_path, index, replicas)
        done |= read_done(output_path)

    def mine(number: int, custom_id: Any) -> bool:
        return replicas == 1 or owner(custom_id, number, replicas) == index

    summary.total = sum(1 for number, request, _ in read_requests(input_path)
                        if mine(number, custom_id_of(request)))
    writer = Writer(output_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bar = tqdm(total=summary.total, desc="batch", unit="req", disable=not progress)
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task] = set()
    fatal: list[BaseException] = []
    started = time.perf_counter()

    def finish(record: dict[str, Any], tokens: int = 0) -> None:
        writer.write(record)
        summary.output_tokens += tokens
        bar.update(1)
        bar.set_postfix(tok_s=f"{summary.output_tokens / (time.perf_counter() - started):.0f}")

    async def one(number: int, request: dict[str, Any]) -> None:
        try:
            body = dict(request["body"])
            body.pop("stream", None)
            api = engine.chat.completions if request["url"] == URLS[0] else engine.completions
            response = await api.create(**body)
            finish(result_record(request["custom_id"], response),
                   response.usage.completion_tokens)
            summary.completed += 1
        except (InvalidRequestError, TypeError) as e:
            finish(error_record(request["custom_id"], "invalid_request", str(e), number))
            summary.failed += 1
        except (EngineError, OSError) as e:  # the engine failed or the disk is full: stop,
            fatal.append(e)                   # keep what is written, redo the rest on rerun
            stop.set()
        finally:
            slots.release()

    try:
        first_line: dict[str, int] = {}  # custom_id -> the line that uses it first
        for number, request, problem in read_requests(input_path):
            custom_id = custom_id_of(request)
            if not mine(number, custom_id):
                continue
            if custom_id is not None:
                first = first_line.setdefault(id_key(custom_id), number)
                if first != number and not problem:
                    problem = f"custom_id {custom_id!r} is already used by line {first}"
            # an error (written here or by one()) is recorded under its line, a result under
            # its custom_id; a rerun skips the line if either is already in the output
            if line_key(number) in done or (not problem and id_key(custom_id) in done):
                summary.skipped += 1
                bar.update(1)
                continue
            if problem:
                finish(error_record(custom_id, "invalid_request", problem, number))
                summary.failed += 1
                continue
            acquire = asyncio.ensure_future(slots.acquire())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if stop.is_set():
                if acquire.done():
                    slots.release()
                acquire.cancel()
                break
            task = asyncio.create_task(one(number, request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        waiting = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if stop.is_set():  # preempted: what finished is on disk, the rest is redone on rerun
            summary.preempted = not fatal
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if fatal:
            raise fatal[0]
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        writer.close()
        bar.close()
        summary.seconds = time.perf_counter() - started
    return summary
