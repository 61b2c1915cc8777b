"""The floor plan of docs/architecture.md, enforced: which room of readme_jax/ may import which,
and that no script imports a script (launch/ and tools/ are the top floor, nothing stands on them).

Imports are read with `ast` (every import, function-local ones included), so nothing is imported
and the whole check takes well under a second.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = "readme_jax"

# What each room may import of the project besides itself, as docs/architecture.md's table says;
# a room may also import whatever the rooms it names may import (the floors below them).
ALLOWED = {
    "model": set(),
    "decode": {"model"},
    "checkpoints": {"model"},
    "data": set(),
    "refactor": {"model", "checkpoints", "data"},
    "train": {"model", "decode", "checkpoints", "data", "refactor"},
    "eval": {"model", "decode", "checkpoints", "data", "refactor"},
    "serve": {"model", "decode", "checkpoints"},
    "serve/bench": {"serve", "eval", "refactor"},
}
# The ground floor: import nothing of the project, importable from every room.
GROUND = {"errors", "cache_dir"}
# The top of the library: may import any room (never launch/ or tools/).
TOP = {"api", "testing", "cli", "served"}

# Script-imports-script and sys.path edits that the tree still has, to be removed as the scripts
# become thin (the review's target layout). The test fails on a new one, and on an entry here
# that is gone (delete it, so the list only shrinks).
KNOWN_SCRIPT_IMPORTS: set[tuple[str, str]] = set()
KNOWN_SYS_PATH: set[str] = set()


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in `path`, relative ones resolved; for
    `from M import n` the module is M.n when that is a module or package of `root`, else M."""
    mod = module_name(path, root)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                m = ".".join(base + ([node.module] if node.module else []))
            else:
                m = node.module or ""
            for a in node.names:
                sub = root.joinpath(*f"{m}.{a.name}".split("."))
                is_mod = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                out.append((node.lineno, f"{m}.{a.name}" if is_mod else m))
    return out


def room(module: str) -> str:
    """readme_jax.serve.bench.run -> serve/bench; readme_jax.serve.engine -> serve;
    readme_jax.model.llama -> model; readme_jax.cli -> cli; readme_jax -> api (it re-exports it)."""
    parts = module.split(".")[1:]
    if not parts:
        return "api"
    if parts[0] == "serve" and len(parts) > 1 and parts[1] == "bench":
        return "serve/bench"
    return parts[0]


def reachable(r: str) -> set[str]:
    seen, todo = set(), [r]
    while todo:
        for s in ALLOWED.get(todo.pop(), set()):
            if s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


def floor_violations(root: Path) -> list[str]:
    """One line per import in `root`/readme_jax that the floor plan forbids."""
    bad = []
    for path in sorted((root / PKG).rglob("*.py")):
        src_room = room(module_name(path, root))
        where = path.relative_to(root)
        if src_room not in ALLOWED and src_room not in GROUND | TOP:
            bad.append(
                f"{where}: room {src_room!r} is not in the floor plan (docs/architecture.md)"
            )
            continue
        for line, target in imported_modules(path, root):
            top = target.split(".")[0]
            if top in ("launch", "tools"):
                bad.append(f"{where}:{line} imports the script {target}")
                continue
            if top != PKG:
                continue
            dst = room(target)
            if src_room in GROUND:
                ok = False
            elif dst == src_room or dst in GROUND:
                ok = True
            elif src_room in TOP:
                ok = dst in ALLOWED or dst in TOP
            else:
                ok = dst in reachable(src_room)
            if not ok:
                bad.append(f"{where}:{line}: {src_room}/ imports {target} ({dst}/)")
    return bad


def script_imports(root: Path) -> set[tuple[str, str]]:
    """(file, module) for every import of launch.* or tools.* anywhere in the repository's code."""
    found = set()
    for folder in ("launch", "tools", "tests", PKG):
        for path in sorted((root / folder).rglob("*.py")):
            for _, target in imported_modules(path, root):
                if target.split(".")[0] in ("launch", "tools"):
                    found.add((path.relative_to(root).as_posix(), target))
    return found


def sys_path_edits(root: Path) -> set[str]:
    found = set()
    for folder in ("launch", "tools"):
        for path in sorted((root / folder).rglob("*.py")):
            if re.search(r"sys\.path\.(insert|append)\(", path.read_text()):
                found.add(path.relative_to(root).as_posix())
    return found


def test_each_room_imports_only_what_the_floor_plan_allows():
    assert floor_violations(ROOT) == []


def test_no_new_script_imports_a_script_and_the_known_list_only_shrinks():
    found = script_imports(ROOT)
    assert not found - KNOWN_SCRIPT_IMPORTS, (
        f"a script imported from a script: {found - KNOWN_SCRIPT_IMPORTS}"
    )
    assert not KNOWN_SCRIPT_IMPORTS - found, (
        f"gone, delete from KNOWN_SCRIPT_IMPORTS: {KNOWN_SCRIPT_IMPORTS - found}"
    )


def test_no_new_sys_path_edit_in_launch_or_tools_and_the_known_list_only_shrinks():
    found = sys_path_edits(ROOT)
    assert not found - KNOWN_SYS_PATH, (
        f"sys.path edited in {found - KNOWN_SYS_PATH}: install the package"
    )
    assert not KNOWN_SYS_PATH - found, f"gone, delete from KNOWN_SYS_PATH: {KNOWN_SYS_PATH - found}"


def test_the_floor_plan_document_lists_the_same_rules():
    """Each row of docs/architecture.md's "What each room may import" table names the rooms
    ALLOWED gives it (before any "never"; "the runtime" is serve/)."""
    doc = (ROOT / "docs/architecture.md").read_text()
    table = doc.split("## What each room may import", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`([a-z_/]+)/", cells[0])
        if not names or "anything" in cells[1] or "nothing" in cells[1]:
            continue
        key = "serve" if "runtime" in cells[0] else names[0]
        allowed = cells[1].split("never")[0]
        listed = {n for n in re.findall(r"`([a-z_/]+)/`", allowed)} - {key}
        rows[key] = listed | ({"serve"} if "the runtime" in allowed else set())
    assert rows == ALLOWED


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, src in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(src)
    return tmp_path


def test_the_checker_catches_a_forbidden_import(tmp_path):
    root = _tree(
        tmp_path,
        {
            "readme_jax/__init__.py": "",
            "readme_jax/errors.py": "",
            "readme_jax/model/__init__.py": "",
            "readme_jax/model/llama.py": "from readme_jax.errors import UserError\n",
            "readme_jax/model/moe.py": "def f():\n    from readme_jax.refactor import experts\n",
            "readme_jax/refactor/__init__.py": "",
            "readme_jax/refactor/experts.py": "from ..model import llama\n",
            "readme_jax/serve/__init__.py": "",
            "readme_jax/serve/engine.py": "from readme_jax.serve.bench import run\n",
            "readme_jax/serve/bench/__init__.py": "",
            "readme_jax/serve/bench/run.py": "from .. import engine\nimport tools.x\n",
            "readme_jax/plugins/x.py": "",
        },
    )
    bad = floor_violations(root)
    assert any("model/moe.py:2: model/ imports readme_jax.refactor.experts" in b for b in bad), bad
    assert any("serve/engine.py:1: serve/ imports readme_jax.serve.bench.run" in b for b in bad), (
        bad
    )
    assert any("serve/bench/run.py:2 imports the script tools.x" in b for b in bad), bad
    assert any("'plugins' is not in the floor plan" in b for b in bad), bad
    assert len(bad) == 4, bad  # the allowed imports (refactor -> model, relative) pass
