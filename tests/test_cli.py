"""The command line: one flag per EngineConfig field, one-line errors, exit codes.

Real `python -m tp_engine` subprocesses, since the exit code and stderr are what is tested.
Only the Ctrl-C test starts an engine: every other failure here happens before a worker does."""

from __future__ import annotations

import dataclasses
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tp_engine.config import DTYPES, EngineConfig
from tp_engine.flags import NOT_FLAGS

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/tp-engine-model"


def tp_engine(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tp_engine", *argv], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env=dict(os.environ, COLUMNS="100"))


def option_help(help_text: str) -> dict[str, str]:
    """Each option's entry of `--help`, keyed by its first flag, whitespace made single."""
    entries = re.split(r"\n  (?=-)", help_text.split("options:", 1)[1])
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries[1:]}


@pytest.mark.parametrize("command", [["generate"], ["serve"], ["batch"], ["bench", "latency"]])
def test_every_field_has_a_flag_with_its_default(command):
    result = tp_engine(*command, "--help")
    assert result.returncode == 0, result.stderr
    options = option_help(result.stdout)
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in NOT_FLAGS or not f.init:  # not init: derived (the parsed model config)
            assert flag not in options or (command == ["serve"] and flag == "--host"), flag
            continue
        entry = options[flag]
        assert f.metadata["help"] in entry
        default = "(default: " if f.default is None else f"(default: {f.default})"
        assert default in entry, entry
    assert "--tp N" in options["--tensor-parallel-size"]
    assert "{" + ",".join(DTYPES) + "}" in options["--dtype"]
    assert "{forkserver,spawn}" in options["--start-method"]  # torchrun is set, not chosen
    assert "--auth-key" not in result.stdout
    assert "smollm2" in result.stdout and ".gguf" in result.stdout  # what MODEL can be


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "During handling" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    ([MISSING], MISSING),
    ([MISSING + ".gguf"], MISSING + ".gguf"),
    (["--config", MISSING + ".yaml"], MISSING + ".yaml"),
    ([], "give a MODEL or a --config"),
])
def test_errors_are_one_line(argv, message):
    line = one_error_line(tp_engine("generate", *argv, "--device", "cpu", "--prompt", "hi"))
    assert message in line


def test_bad_value_is_one_line(tiny_model):
    line = one_error_line(tp_engine("generate", tiny_model, "--tp", "0", "--prompt", "hi"))
    assert "tensor_parallel_size must be at least 1" in line


def test_batch_error_is_one_line(tmp_path):
    line = one_error_line(tp_engine("batch", MISSING, "-i", str(tmp_path / "in.jsonl"),
                                    "-o", str(tmp_path / "out.jsonl")))
    assert MISSING in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where):
    argv = ["generate", MISSING, "--prompt", "hi"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    result = tp_engine(*argv)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_bad_choice_is_argparse_usage_error():
    result = tp_engine("generate", MISSING, "--prompt", "hi", "--dtype", "float8")
    assert result.returncode == 2
    assert "usage: tp-engine generate" in result.stderr
    assert "argument --dtype: invalid choice: 'float8'" in result.stderr
    assert "Traceback" not in result.stderr


def test_keyboard_interrupt_exits_130_with_a_newline():
    code = ("import sys, tp_engine.cli as cli\n"
            "def interrupted(args): raise KeyboardInterrupt\n"
            "cli.cmd_generate = interrupted\n"
            f"sys.exit(cli.main(['generate', {MISSING!r}, '--prompt', 'hi']))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                            capture_output=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "\n")


def test_ctrl_c_while_generating_terminates_the_engine(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, once the first
    characters are out: exit 130, a newline on stderr, and no worker left behind."""
    env = dict(os.environ, TP_ENGINE_CACHE=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tp_engine", "generate", "tiny-llama", "--device", "cpu",
         "--prompt", "hi", "--max-tokens", "2000", "--kv-cache-memory-gb", "0.25"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and os.read(proc.stdout.fileno(), 1), "no output"
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert err == b"\n"
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "a worker outlived the engine"
