"""What every launch script shares: user errors end in one clear line and a non-zero exit.

  if __name__ == "__main__":
      cli.run(main)          # absl app.run(main), user errors -> "error: ..." on stderr, exit 1

  c = cli.parse_config("configs/serve_bench.py", argv)   # --config.x=y, old --x=y mapped

Every `--config.KEY=...` is checked against the config file before anything runs
(`check_keys`; `parse_config`, or `define_config` for scripts on absl's global flags): an
unknown key is one line with a "did you mean" where a near key exists.

A user error is a `readme_jax.errors.UserError` the library raises for bad input (a missing or
corrupt checkpoint, a bad config value, a prompt too long, a malformed trace or corpus, a failed
download), or a FileNotFoundError; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from readme_jax.errors import UserError
from readme_jax.model.config import ConfigError

# Every user-facing error subclasses UserError (readme_jax/errors.py); a missing file named on
# the command line is the user's to fix too.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)

# A launch script prints its own progress and results, not the libraries' INFO lines. Both
# variables are read late enough to be set here, at import of the plumbing: transformers is
# imported lazily (it serves tokenizers and chat templates only, so its "PyTorch was not found"
# advisory is noise) and XLA's C++ logger reads its level at its first line. A value the user
# set wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


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
    """absl `app.run(main)` with `guarded` user errors, absl/orbax/jax logging at WARNING
    (app.run would show their INFO lines) unless `--verbosity`/`-v` is given."""

    def quiet_main(argv: list[str]) -> Any:
        if not any(a.split("=")[0] in ("--verbosity", "-v", "--v") for a in sys.argv[1:]):
            logging.set_verbosity(logging.WARNING)
        return main(argv)

    quiet_main.__doc__ = main.__doc__
    app.run(guarded(quiet_main))


def define_config(default_file: str, help_text: str):
    """`config_flags.DEFINE_config_file("config", default_file, ...)` for a script on absl's
    global flags, after `check_argv` on sys.argv: ml_collections applies the `--config.KEY`
    overrides as soon as the flag is defined, so an unknown key is caught here, in one line
    (exit 1), instead of as a traceback at import."""
    if not any(a in HELP_FLAGS for a in sys.argv[1:]):
        guarded(check_argv)(sys.argv[1:], default_file)
    return config_flags.DEFINE_config_file("config", default_file, help_text)


def check_argv(argv: Sequence[str], default_config: str | Path) -> None:
    """`check_keys` on `argv` against the file its `--config=FILE` names (else the default)."""
    config_file = str(default_config)
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            config_file = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            config_file = argv[i + 1]
    check_keys(argv, _defaults(config_file), config_file)


def _keys(c: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k in c.keys():
        out.append(prefix + k)
        if isinstance(c[k], ConfigDict):
            out += _keys(c[k], f"{prefix}{k}.")
    return out


def check_keys(argv: Sequence[str], defaults: ConfigDict, where: str | Path = "the config") -> None:
    """Raise ConfigError, one line, for the first `--config.KEY[=...]` (or `--noconfig.KEY`)
    in `argv` whose KEY is not in `defaults`, with a "did you mean" where a key is close
    (difflib, on the whole dotted key, else on its last part)."""
    known = _keys(defaults)
    for a in argv:
        flag = a.split("=", 1)[0]
        key = next((flag[len(p) :] for p in ("--config.", "--noconfig.") if flag.startswith(p)), "")
        if not key or key in known:
            continue
        near = difflib.get_close_matches(key, known, n=1)
        if not near:
            leaf = key.rpartition(".")[2]
            ends = {k.rpartition(".")[2]: k for k in known}
            near = [ends[m] for m in difflib.get_close_matches(leaf, list(ends), n=1)]
        hint = f"; did you mean {near[0]!r}?" if near else "; --help lists the settings"
        raise ConfigError(f"unknown config key {key!r} ({a}) in {where}{hint}")


def _defaults(config_file: str | Path) -> ConfigDict:
    path, _, variant = str(config_file).partition(":")  # FILE:ARG, as ml_collections reads it
    spec = importlib.util.spec_from_file_location("_launch_config", path)
    if spec is None or spec.loader is None or not Path(path).is_file():
        raise ConfigError(f"cannot load config file {config_file}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant) if variant else mod.get_config()


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
    exits 0. Raises ConfigError on an unknown flag or key (`check_keys`) or a bad value."""
    if any(a in HELP_FLAGS for a in argv):
        try:
            print(config_help(config_file), flush=True)
        except BrokenPipeError:  # `--help | head`
            sys.stdout = None
        raise SystemExit(0)
    fv = flags.FlagValues()
    defaults = _defaults(config_file)
    args = ["launch", *config_argv(argv, defaults, negated)]
    check_argv(args[1:], config_file)
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
