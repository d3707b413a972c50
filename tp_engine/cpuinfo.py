"""The CPU as /proc/cpuinfo describes its first core: model name, flags and clock. Read by the
kernel builder (a build is for one CPU) and the benchmarks (which print the machine)."""

from __future__ import annotations

import functools
import platform


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first value of each field ("model name", "flags", "cpu MHz", ...); {} off Linux."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def model_name() -> str:
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def flags() -> set[str]:
    return set(cpuinfo().get("flags", "").split())


def mhz() -> float:
    try:
        return float(cpuinfo().get("cpu MHz", 0))
    except ValueError:
        return 0.0
