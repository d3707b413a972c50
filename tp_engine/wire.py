"""The wire between the controller and the workers: every message type, its msgpack frame, and
the ZeroMQ socket set-up. Nothing here ever unpickles; a frame that is not one of these
messages raises WireError, which receivers log and drop.

A frame is the msgpack array [VERSION, tag, *fields]. Token ids travel as raw int32 bytes.
Over TCP every frame is preceded by its HMAC-SHA256 under a secret the ranks share, so a peer
without the secret is refused; over IPC the private 0700 directory keeps strangers out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import msgpack
import zmq

from tp_engine.errors import ConfigError

VERSION = 3
MAX_FRAME_BYTES = 64 << 20


class WireError(ValueError):
    """A frame that is not a valid message of this version."""


_BY_TAG: dict[int, type[Message]] = {}
_CHECKS = {"int": int, "float": (int, float), "str": str, "bytes": bytes, "bool": bool,
           "list": list, "int | None": (int, type(None))}


@dataclass
class Message:
    tag: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.tag in _BY_TAG:
            raise TypeError(f"wire tag {cls.tag} used twice")
        _BY_TAG[cls.tag] = cls


@dataclass
class Ready(Message):
    """A worker loaded its shard and allocated its KV cache."""
    tag: ClassVar[int] = 1
    rank: int
    pid: int
    num_kv_blocks: int
    param_bytes: int


@dataclass
class LoadFailed(Message):
    tag: ClassVar[int] = 2
    rank: int
    error: str


class Sample(NamedTuple):
    """A sequence to sample in a step. Step.samples carries these as plain lists."""
    index: int           # the sequence's place in the step
    temperature: float   # 0: greedy
    top_p: float
    top_k: int           # 0: all
    seed: int            # -1: the engine's generator
    output_index: int    # which output token it draws: a seeded draw depends on it
    min_p: float
    state: int           # the sequence's id when rank 0 keeps a SequenceSetup for it, else -1


class SequenceSetup(NamedTuple):
    """What rank 0 keeps for a sequence whose sampling needs more than a Sample: penalties,
    logit bias, min_tokens, logprobs, a grammar. Sent with the step that starts (or, after a
    preemption, restarts) the sequence; `output` holds the tokens it already produced, from
    which the counts and the grammar's state are rebuilt. Step.setups carries plain lists."""
    seq_id: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_tokens: int
    bias_ids: list        # logit_bias, as two lists
    bias_values: list
    stop_ids: list        # what min_tokens holds back: EOS and the stop tokens
    logprobs: int         # top alternatives per output token; -1: none
    prompt_logprobs: int  # the same for the prompt's tokens; -1: none
    grammar: list         # [kind, text] (see SamplingParams.grammar), or []
    prompt: bytes         # int32 token ids: the prompt, for repetition and prompt logprobs only
    output: bytes         # int32 token ids produced so far


@dataclass
class Step(Message):
    """One forward pass. Sequence i brings query_lens[i] new tokens after starts[i] cached ones;
    `samples` lists a Sample for each sequence whose last new token is to be sampled (by
    rank 0). Steps are pipelined: a token
    the previous step is still sampling travels as -1 - k, "the last token of sample k of the
    previous step", which every rank fills in from the tokens rank 0 shares after each step.
    `decode_steps`, when not empty, makes this a run of decode steps (see model/decode_run):
    every sequence decodes and is sampled, and sequence i runs decode_steps[i] steps.
    `setups` are SequenceSetups rank 0 takes before the step, after dropping the states of
    the sequence ids in `releases` (finished ones). `logit_rows` names the sequences (by
    index) whose every new token gets logits: their prompt logprobs."""
    tag: ClassVar[int] = 3
    step_id: int
    starts: list
    query_lens: list
    token_ids: bytes
    block_tables: list
    samples: list
    decode_steps: list
    setups: list = dataclasses.field(default_factory=list)
    releases: list = dataclasses.field(default_factory=list)
    logit_rows: list = dataclasses.field(default_factory=list)
    report_steps: bool = False  # a run of decode steps: send a StepTokens after each step

    def named_samples(self) -> list[Sample]:
        """`samples` by name; a ValueError for one of the wrong shape."""
        try:
            return [Sample(*s) for s in self.samples]
        except TypeError:
            raise ValueError("step: a sample is not [index, temperature, top_p, top_k, seed, "
                             "output index, min_p, state]") from None

    def named_setups(self) -> list[SequenceSetup]:
        try:
            return [SequenceSetup(*s) for s in self.setups]
        except TypeError:
            raise ValueError("step: a setup has the wrong number of fields") from None


# a token's logprobs: [its logprob, [top ids], [their logprobs]]
TokenLogprobs = list


@dataclass
class StepDone(Message):
    """Rank 0's sampled tokens: each sampled sequence's, in sample order (in a run of decode
    steps, sequence i's decode_steps[i] tokens together); and the steps it ran and the seconds
    they spent in the model (forward, LM head, sampling), for metrics and benchmarks.
    `logprobs` is empty, or one TokenLogprobs (None for a sequence that asked none) for each
    token of `token_ids`; `prompt_logprobs` lists [sequence index, [one
    TokenLogprobs per position]] for the step's logit_rows."""
    tag: ClassVar[int] = 4
    step_id: int
    token_ids: list
    steps: int
    model_seconds: float
    logprobs: list = dataclasses.field(default_factory=list)
    prompt_logprobs: list = dataclasses.field(default_factory=list)


@dataclass
class StepTokens(Message):
    """Rank 0's tokens of step `index` of a run of decode steps (one per sequence still
    running at that step, in batch order), sent while the run goes on; the StepDone that ends
    the run still carries every token."""
    tag: ClassVar[int] = 8
    step_id: int
    index: int
    token_ids: list
    logprobs: list = dataclasses.field(default_factory=list)


@dataclass
class StepFailed(Message):
    tag: ClassVar[int] = 5
    rank: int
    step_id: int
    error: str


@dataclass
class Shutdown(Message):
    tag: ClassVar[int] = 6


@dataclass
class Goodbye(Message):
    """A worker left its loop and destroyed its process group."""
    tag: ClassVar[int] = 7
    rank: int


def encode(msg: Message) -> bytes:
    fields = [getattr(msg, f.name) for f in dataclasses.fields(msg)]
    return msgpack.packb([VERSION, msg.tag, *fields], use_bin_type=True)


def decode(frame: bytes) -> Message:
    if len(frame) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise WireError(f"not a msgpack frame: {e}") from None
    if not isinstance(raw, list) or len(raw) < 2:
        raise WireError("a frame must be [version, tag, *fields]")
    version, tag, *values = raw
    if version != VERSION:
        raise WireError(f"wire version {version!r}, expected {VERSION}")
    cls = _BY_TAG.get(tag) if isinstance(tag, int) else None
    if cls is None:
        raise WireError(f"unknown message tag {tag!r}")
    fields = dataclasses.fields(cls)
    if len(values) != len(fields):
        raise WireError(f"{cls.__name__} takes {len(fields)} fields, got {len(values)}")
    for f, value in zip(fields, values):
        expected = _CHECKS[f.type]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise WireError(f"{cls.__name__}.{f.name} must be {f.type}, "
                            f"got {type(value).__name__}")
    return cls(*values)


# --- links: a socket and the key its frames are signed with ---------------------------------

class Link:
    def __init__(self, sock: zmq.Socket, key: bytes | None):
        self.sock, self.key = sock, key

    def frames(self, msg: Message) -> list[bytes]:
        payload = encode(msg)
        return [payload] if self.key is None else [_mac(self.key, payload), payload]

    def send(self, msg: Message, flags: int = 0) -> None:
        self.sock.send_multipart(self.frames(msg), flags=flags)

    def recv(self) -> tuple[bytes | None, Message]:
        """(the sender's identity on a ROUTER, else None; the message). Raises WireError for
        a frame that is malformed or not signed with our key, after receiving it whole."""
        frames = self.sock.recv_multipart()
        sender = frames.pop(0) if self.sock.type == zmq.ROUTER else None
        return sender, self.open(frames)

    def open(self, frames: list[bytes]) -> Message:
        if self.key is None:
            if len(frames) != 1:
                raise WireError(f"expected one frame, got {len(frames)}")
            return decode(frames[0])
        if len(frames) != 2 or not hmac.compare_digest(frames[0], _mac(self.key, frames[1])):
            raise WireError("refused a frame without a valid HMAC (a peer without the secret)")
        return decode(frames[1])


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


# --- sockets -------------------------------------------------------------------------------

IPC_PREFIX = "tp-engine-"
# a socket's path must fit sockaddr_un; the longest we make is <base>/<IPC dir>/<replica>/control
_SOCKET_PATH_MAX = getattr(zmq, "IPC_PATH_MAX_LEN", 107)
_IPC_TAIL = len(f"/{IPC_PREFIX}4194304-xxxxxxxx/9999/control")
_SHORT_BASE = "/tmp"


def ipc_base() -> str:
    """Where IPC directories go: the temp directory, or /tmp where the temp directory's path
    is too long for a socket's (a long TMPDIR, as some batch schedulers set)."""
    base = tempfile.gettempdir()
    if len(base) + _IPC_TAIL <= _SOCKET_PATH_MAX:
        return base
    if os.path.isdir(_SHORT_BASE) and os.access(_SHORT_BASE, os.W_OK | os.X_OK):
        return _SHORT_BASE
    raise ConfigError(f"the temp directory {base!r} is too long for a socket path (at most "
                      f"{_SOCKET_PATH_MAX - _IPC_TAIL} characters here) and /tmp is not "
                      "writable: set TMPDIR to a shorter directory")


def private_ipc_dir() -> str:
    """A fresh directory only this user can enter (mkdtemp makes it 0700), named after this
    process so that one left by a controller killed with SIGKILL can be recognised."""
    remove_stale_ipc_dirs()
    return tempfile.mkdtemp(prefix=f"{IPC_PREFIX}{os.getpid()}-", dir=ipc_base())


def remove_stale_ipc_dirs() -> list[str]:
    """Remove our IPC directories whose controller is gone (SIGKILL leaves no chance to)."""
    removed = []
    bases = {tempfile.gettempdir(), _SHORT_BASE}
    for path in (p for base in bases for p in Path(base).glob(f"{IPC_PREFIX}*-*")):
        pid = path.name[len(IPC_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid() or pid_alive(int(pid)):
                continue
            shutil.rmtree(path)
            removed.append(str(path))
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_state(pid: int | None) -> str:
    """The state letter of /proc/PID/stat (T: stopped, Z: a zombie), or "" where it cannot
    be read (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def control_endpoint(ipc_dir: str, host: str | None = None) -> str:
    """Where the controller binds: a socket file in the private directory, or TCP on `host`
    with a port the OS picks (loopback unless an interface is named)."""
    if host is None:
        return f"ipc://{os.path.join(ipc_dir, 'control')}"
    return f"tcp://{host}:*"


def bind_router(ctx: zmq.Context, endpoint: str) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished worker raises, not vanishes
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a restarted rank takes its identity back
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.bind(endpoint)
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def connect_dealer(ctx: zmq.Context, endpoint: str, rank: int) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity(rank))
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.connect(endpoint)
    return sock


def identity(rank: int) -> bytes:
    return f"rank-{rank}".encode()
