"""Which of the repository's source files a module needs: its imports, followed transitively inside the repo.

DVC reruns a stage when one of its listed deps changes, so a stage's code deps must be exactly this closure
(tests/test_dvc_deps.py holds dvc.yaml to it). A module that packs code into the submission script depends
on everything the script holds.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pgolf", "stages")
EMBEDS = {"pgolf.export": "pgolf.submission"}  # module -> the module whose closure it packs as text


def module_path(name: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(name: str, root: Path = ROOT) -> set[str]:
    """Repo modules `name` imports anywhere in its body (absolute or relative, at any depth)."""
    path = module_path(name, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in PACKAGES and module_path(t, root)}
    return found


def closure(name: str, root: Path = ROOT) -> list[Path]:
    """Every repo source file `name` needs, as paths relative to the root (packages' __init__.py included)."""
    seen, todo = set(), [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
        todo += sorted(imports_of(mod, root))
        if mod in EMBEDS:
            todo.append(EMBEDS[mod])
    return sorted(module_path(m, root).relative_to(root) for m in seen)
