"""A worker leaves by itself when its controller dies, even by SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from multiprocessing.connection import Connection

from tp_engine.wire import pid_alive

PR_SET_PDEATHSIG = 1


def watch_parent(alive: Connection | None, controller_pid: int) -> None:
    """Three guards: the kernel's parent-death signal (set from the main thread, since it is
    tied to the thread that forked us), a check right after it for a parent already gone, and
    a pipe whose only writer is the controller: EOF means it is dead."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe alone guards
        pass
    if os.getppid() != parent or not pid_alive(controller_pid):
        os._exit(1)
    if alive is not None:
        threading.Thread(target=_exit_on_eof, args=(alive,), name="parent-watch",
                         daemon=True).start()


def _exit_on_eof(alive: Connection) -> None:
    try:
        while True:
            alive.recv_bytes()
    except (EOFError, OSError):
        os._exit(1)

