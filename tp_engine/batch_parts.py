"""A batch job split among data-parallel replicas (torchrun's world of dp x tp ranks).

Every replica reads the whole input and serves the lines whose key hashes to it (a stable
hash of the custom_id, or of the line number for a line without one, so that the lines that
share a custom_id meet on one replica, which can tell the first from the rest). Each appends
to a part file of its own next to the output, exactly once and resumable as a single job's
output is (tp_engine/batch), and marks the part complete when every line of its share is in
it. The first replica then waits for every mark and merges the parts, with what the output
already held, into the output, in input order, written whole and renamed into place; the
parts go last. A rerun after a kill at any moment resumes each part and merges again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from pathlib import Path

from tp_engine.batch import custom_id_of, id_key, line_key, read_done, read_requests, record_key

POLL_S = 0.2


def owner(custom_id: object, number: int, replicas: int) -> int:
    """The replica that serves an input line."""
    key = line_key(number) if custom_id is None else id_key(custom_id)
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % replicas


def part_path(output: Path, index: int, replicas: int) -> Path:
    return output.with_name(f"{output.name}.part-{index}-of-{replicas}")


def complete_mark(output: Path, index: int, replicas: int) -> Path:
    part = part_path(output, index, replicas)
    return part.with_name(part.name + ".complete")


def mark_complete(output: Path, index: int, replicas: int) -> None:
    complete_mark(output, index, replicas).touch()


async def wait_for_parts(output: Path, replicas: int) -> bool:
    """Until every part is marked complete (True), or SIGTERM or SIGINT (False)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not all(complete_mark(output, i, replicas).exists() for i in range(replicas)):
            try:
                await asyncio.wait_for(stop.wait(), POLL_S)
                return False
            except asyncio.TimeoutError:
                pass
        return True
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def merge(input_path: Path, output: Path, replicas: int) -> int:
    """The output, made of itself and every part, each record once, in input order; the
    parts removed. Returns the number of records."""
    first_line: dict[str, int] = {}
    for number, request, _ in read_requests(input_path):
        custom_id = custom_id_of(request)
        if custom_id is not None:
            first_line.setdefault(id_key(custom_id), number)
    records: dict[str, tuple[int, bytes]] = {}
    sources = [output] + [part_path(output, i, replicas) for i in range(replicas)]
    for source in sources:
        if not source.exists():
            continue
        read_done(source)  # cuts a torn last line
        with source.open("rb") as f:
            for raw in f:
                key = record_key(json.loads(raw))
                line = int(key[5:]) if key.startswith("line:") else first_line.get(key, 0)
                records.setdefault(key, (line, raw))
    merged = output.with_name(output.name + ".merging")
    with merged.open("wb") as f:
        for _, raw in sorted(records.values(), key=lambda item: item[0]):
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(merged, output)
    for i in range(replicas):
        for path in (part_path(output, i, replicas), complete_mark(output, i, replicas)):
            path.unlink(missing_ok=True)
    return len(records)
