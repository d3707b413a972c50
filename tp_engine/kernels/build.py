"""Build a kernel's C source into a shared library on first use, and load it with ctypes.

The library is built for this CPU (-march=native), so its file is named by a hash of the
source and the headers beside it, the flags, the compiler and the CPU's model and flags: a
cache directory shared by machines of different CPUs (a home directory on a cluster) never
serves one the wrong build. Workers that build at once each write a file of their own and
rename it into place."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from tp_engine import cpuinfo

log = logging.getLogger(__name__)

# -ffp-contract=off: no fused multiply-add where a kernel must round as torch does
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11",
         "-ffp-contract=off",
         *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()))
BUILD_TIMEOUT_S = 120.0
_loaded: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    root = Path(os.environ.get("TP_ENGINE_CACHE", "~/.cache/tp-engine")).expanduser()
    return root / "kernels"


def library_path(name: str, compiler: str) -> tuple[Path, Path]:
    """(the kernel's source, the library built from it for this machine)."""
    source = Path(__file__).with_name(f"{name}.c")
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    parts = [source.read_text(), *headers, *FLAGS, compiler, platform.machine(),
             cpuinfo.model_name(), " ".join(sorted(cpuinfo.flags()))]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return source, cache_dir() / f"{name}-{key}.so"


def build(name: str) -> Path:
    """The library of kernel `name` for this machine, built if it is not cached yet.
    Raises OSError where there is no compiler or the build fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) found")
    source, target = library_path(name, compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(source), "-lm"],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed on {source}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    except subprocess.TimeoutExpired as e:
        raise OSError(f"{compiler} took over {BUILD_TIMEOUT_S:.0f} s on {source}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(name: str) -> ctypes.CDLL | None:
    """Kernel `name`'s library, built if needed; None (logged once) where it cannot be."""
    if name not in _loaded:
        try:
            _loaded[name] = ctypes.CDLL(str(build(name)))
        except OSError as e:
            log.warning("the %s kernel is unavailable, using the torch path: %s", name, e)
            _loaded[name] = None
    return _loaded[name]
