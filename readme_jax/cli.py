"""What every launch script shares: user errors end in one clear line and a non-zero exit.

  if __name__ == "__main__":
      cli.run(main)          # absl app.run(main), user errors -> "error: ..." on stderr, exit 1

  c = cli.parse_config("configs/serve_bench.py", argv)   # --config.x=y, old --x=y mapped

A user error is an exception the library raises for bad input (a missing or corrupt checkpoint,
a bad config value, a prompt too long, a malformed trace or corpus, a failed download); any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from readme_jax.checkpoints.errors import CheckpointError, TextError
from readme_jax.data.corpora import CorpusError
from readme_jax.data.fetch import FetchError
from readme_jax.data.rdata import RDataError
from readme_jax.data.tasks import TaskError
from readme_jax.decode.steps import PromptError
from readme_jax.model.config import ConfigError
from readme_jax.serve.bench.replay import ReplayError
from readme_jax.serve.bench.trace import TraceError
from readme_jax.train.config import TrainConfigError
from readme_jax.train.context import TrainingError

USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    ConfigError,
    CorpusError,
    FetchError,
    FileNotFoundError,
    PromptError,
    RDataError,
    ReplayError,
    TaskError,
    TextError,
    TraceError,
    TrainConfigError,
    TrainingError,
)


def guarded(main: Callable[..., Any]) -> Callable[..., Any]:
    """`main` with user errors turned into one line on stderr and exit status 1."""

    def wrapped(*args: Any, **kw: Any) -> Any:
        try:
            return main(*args, **kw)
        except USER_ERRORS as e:
            sys.exit(f"error: {e}")

    wrapped.__doc__ = main.__doc__
    return wrapped


def run(main: Callable[[list[str]], Any]) -> None:
    """absl `app.run(main)` with `guarded` user errors."""
    app.run(guarded(main))


def _defaults(config_file: str | Path) -> ConfigDict:
    spec = importlib.util.spec_from_file_location("_launch_config", config_file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {config_file}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def config_argv(
    argv: Sequence[str], defaults: ConfigDict, negated: Mapping[str, str] | None = None
) -> list[str]:
    """Old-style flags -> config overrides: `--x=y` / `--x y` -> `--config.x=y` for top-level
    keys of `defaults`; a bare `--x` of a bool key -> True; `--NAME` in `negated` -> False."""
    negated = negated or {}
    out: list[str] = []
    it = iter(argv)
    for a in it:
        name, eq, val = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if name in negated:
            out.append(f"--config.{negated[name]}=False")
        elif name and name != "config" and name in defaults:
            if not eq:
                val = "True" if isinstance(defaults[name], bool) else next(it, "")
            out.append(f"--config.{name}={val}")
        else:
            out.append(a)
    return out


HELP_FLAGS = ("-h", "-help", "--help", "--helpshort", "--helpfull")


def config_help(config_file: str | Path) -> str:
    """`--help` of a config-driven script: the script's docstring, then its config file (every
    setting with its default and comment)."""
    main = sys.modules.get("__main__")
    doc = ((main.__doc__ if main is not None else None) or "").strip()
    return (
        f"{doc}\n\nSettings: --config.KEY=VALUE overrides one (--config=FILE reads another "
        f"file); defaults and their meaning, from {config_file}:\n\n"
        f"{Path(config_file).read_text()}"
    )


def parse_config(
    config_file: str | Path, argv: Sequence[str], negated: Mapping[str, str] | None = None
) -> ConfigDict:
    """`--config=FILE --config.x=y ...` (default FILE `config_file`; old `--x=y` flags mapped
    by `config_argv`) parsed on a private flag registry, so a script's `main(argv)` can be
    called more than once in a process. `--help` (any of HELP_FLAGS) prints `config_help` and
    exits 0. Raises ConfigError on an unknown flag or bad value."""
    if any(a in HELP_FLAGS for a in argv):
        try:
            print(config_help(config_file), flush=True)
        except BrokenPipeError:  # `--help | head`
            sys.stdout = None
        raise SystemExit(0)
    fv = flags.FlagValues()
    args = ["launch", *config_argv(argv, _defaults(config_file), negated)]
    try:
        holder = config_flags.DEFINE_config_file(
            "config", str(config_file), "config file (ml_collections)", fv, sys_argv=args
        )
        fv(args)
    except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ConfigError(str(e)) from e
    return holder.value


def csv(s: str) -> tuple[str, ...]:
    """ "a, b," -> ("a", "b")."""
    return tuple(x.strip() for x in str(s).split(",") if x.strip())


def ints(s: str) -> tuple[int, ...]:
    """ "4,16" -> (4, 16); raises ConfigError on a non-integer."""
    try:
        return tuple(int(x) for x in csv(s))
    except ValueError as e:
        raise ConfigError(f"expected comma-separated integers, got {s!r}") from e
