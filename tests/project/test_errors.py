"""User errors share one base class the CLI catches; one cache directory; launch scripts quiet."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from readme_jax import cache_dir, cli
from readme_jax.checkpoints import store, tokenizer
from readme_jax.data import fetch
from readme_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
# Exceptions that never reach a user as such: the HTTP layer turns them into status codes.
INTERNAL = {"QueueFull", "Draining", "EngineFailed", "ApiError"}


def _exception_classes():
    """(module, class name) of every class in readme_jax/ whose direct base is an exception."""
    out = []
    for p in sorted((ROOT / "readme_jax").rglob("*.py")):
        mod = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [
                b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
            ]
            if any(b.endswith(("Error", "Exception")) for b in bases):
                out.append((mod, node.name))
    return out


def test_every_user_facing_error_class_is_a_user_error():
    found = _exception_classes()
    names = {n for _, n in found}
    assert {"CheckpointError", "ConfigError", "SkillsError", "TrainingError"} <= names
    not_user = []
    for mod, name in found:
        cls = getattr(importlib.import_module(mod), name)
        if name not in INTERNAL and not issubclass(cls, UserError):
            not_user.append(f"{mod}.{name}")
    assert not not_user, (
        f"error classes that do not subclass readme_jax.errors.UserError: {not_user}"
    )


def test_user_errors_keep_their_builtin_base():
    from readme_jax.data.fetch import FetchError
    from readme_jax.model.config import ConfigError

    assert issubclass(ConfigError, ValueError) and issubclass(FetchError, RuntimeError)


@pytest.mark.parametrize(
    "err",
    [
        ("readme_jax.eval.skills", "SkillsError"),
        ("readme_jax.checkpoints.errors", "CheckpointError"),
        ("readme_jax.train.distributed", "DistributedError"),
    ],
)
def test_the_cli_turns_any_user_error_into_one_line_and_exit_1(err):
    cls = getattr(importlib.import_module(err[0]), err[1])

    def main():
        raise cls("the file q.jsonl is broken")

    with pytest.raises(SystemExit) as e:
        cli.guarded(main)()
    assert e.value.code == "error: the file q.jsonl is broken"


def test_a_bug_keeps_its_traceback():
    def main():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        cli.guarded(main)()


def test_one_cache_directory_for_data_tokenizers_and_verification(monkeypatch, tmp_path):
    monkeypatch.delenv("READEME_CACHE", raising=False)
    monkeypatch.setenv("READMEJAX_CACHE_DIR", str(tmp_path / "c"))
    assert fetch.cache_root() == tmp_path / "c"
    assert tokenizer._disk_cache_file(("id",), "x.gguf").parent == tmp_path / "c" / "tokenizers"
    assert store._verified_record(tmp_path).parent == tmp_path / "c" / "verified"


def test_off_turns_memo_caches_off_but_data_keeps_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv("READEME_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("READMEJAX_CACHE_DIR", "off")
    assert tokenizer._disk_cache_file(("id",), "x.gguf") is None
    assert store._verified_record(tmp_path) is None
    assert fetch.cache_root() == tmp_path / "readme_jax"


def test_the_old_variable_still_works_with_one_deprecation_line(monkeypatch, tmp_path, capsys):
    cache_dir._deprecated.cache_clear()
    monkeypatch.delenv("READMEJAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("READEME_CACHE", str(tmp_path / "old"))
    assert fetch.cache_root() == tmp_path / "old"
    assert fetch.cache_root() == tmp_path / "old"
    err = capsys.readouterr().err
    assert err.count("READEME_CACHE is deprecated, use READMEJAX_CACHE_DIR") == 1
    monkeypatch.setenv("READMEJAX_CACHE_DIR", str(tmp_path / "new"))
    assert fetch.cache_root() == tmp_path / "new"  # the new name wins
    assert "ignored" in capsys.readouterr().err
    cache_dir._deprecated.cache_clear()


def test_a_launch_script_prints_no_library_info_lines():
    """Through cli.run: absl INFO (orbax, jax log through it) hidden, and transformers'
    PyTorch advisory not printed; `--verbosity=0` brings the INFO lines back."""
    script = (
        "import logging as pl\n"
        "from absl import logging\n"
        "from readme_jax import cli\n"
        "def main(argv):\n"
        "    logging.info('absl-info-line')\n"
        "    pl.getLogger('orbax').info('orbax-info-line')\n"
        "    import transformers\n"
        "    print('done', flush=True)\n"
        "cli.run(main)\n"
    )
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if not k.startswith(("TRANSFORMERS_", "TF_CPP"))
    }
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0 and "done" in r.stdout, r.stderr
    for line in ("absl-info-line", "orbax-info-line", "PyTorch was not found"):
        assert line not in r.stderr, r.stderr
    r = subprocess.run(
        [sys.executable, "-c", script, "--verbosity=0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "absl-info-line" in r.stderr and "orbax-info-line" in r.stderr, r.stderr
