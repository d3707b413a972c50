"""EngineConfig's fields as command-line flags, shared by the CLI's subcommands and the
benchmarks: one flag per field, its help and choices taken from the field."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from tp_engine.config import EngineConfig
from tp_engine.errors import ConfigError

# the fields that are not flags: the positional MODEL; a secret, never on a command line (its
# variable is TP_ENGINE_AUTH_KEY); the control socket's address, set under torchrun (from
# MASTER_ADDR) or in a --config file, and `serve --host` is the HTTP address
NOT_FLAGS = ("model", "auth_key", "host")
METAVARS = {int: "N", float: "X", str: "S"}
SHORT = {"tensor_parallel_size": ("--tp",), "data_parallel_size": ("--dp",)}


def engine_fields() -> list[tuple[dataclasses.Field, type]]:
    """The EngineConfig fields given as flags, each with the type its flag parses."""
    hints = typing.get_type_hints(EngineConfig)
    return [(f, _parsed_type(hints[f.name])) for f in dataclasses.fields(EngineConfig)
            if f.init and f.name not in NOT_FLAGS]


def _parsed_type(hint: typing.Any) -> type:
    """`X | None` parses as X."""
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """MODEL, --config and one flag per field. No defaults are set here: a flag not given
    stays None, so the --config file's value (or the field's default) wins."""
    model = next(f for f in dataclasses.fields(EngineConfig) if f.name == "model")
    parser.add_argument("model", nargs="?", metavar="MODEL", help=model.metadata["help"])
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of Engine keywords; the flags given override it")
    for f, kind in engine_fields():
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *SHORT.get(f.name, ())]
        help_text = f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(*names, dest=f.name, type=kind, choices=choices, help=help_text,
                                metavar=None if choices else METAVARS.get(kind, "S"))


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The Engine keywords: the YAML file's, overridden by the flags given (under torchrun,
    what `run_under_torchrun` set)."""
    if getattr(args, "engine_overrides", None):
        return args.engine_overrides
    kwargs = {f.name: getattr(args, f.name) for f, _ in engine_fields()
              if getattr(args, f.name, None) is not None}
    if args.model:
        kwargs["model"] = args.model
    if args.config:
        try:
            return EngineConfig.from_yaml(args.config, **kwargs).keywords()
        except (OSError, ValueError, TypeError) as e:  # a missing file or model, a bad value
            raise ConfigError(str(e)) from e
    if "model" not in kwargs:
        raise ConfigError("give a MODEL or a --config that names one")
    return kwargs
