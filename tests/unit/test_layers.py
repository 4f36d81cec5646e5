"""The package's layers, as README's layout lists them: a module imports only from its own
layer or the layers below it (every import, module-level or inside a function)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "connector"
#: top to bottom, as in README.md "Layout"; each may import what comes after it.
LAYERS = [
    "cli",
    "runtime",
    "consumer",
    "observability",
    "cutover",
    "delivery",
    "records",
    "protocol",
    "config",
    "decoding",
    "auth",
    "errors",
    "faults",
]
#: the package's own top level (its version) is importable from anywhere.
ANYWHERE = {"", "py", "__version__"}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else ""


def imported_layers(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "connector":
                names = [f"connector.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "connector":
                found.add((parts[1] if len(parts) > 1 else "", node.lineno))
    return found


def test_every_layer_is_listed() -> None:
    on_disk = {layer_of(p) for p in PACKAGE.rglob("*.py")} - ANYWHERE
    assert on_disk == set(LAYERS), "a new package: place it in LAYERS and in README's layout"


def test_dependencies_point_down() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer_of(path)
        if own in ANYWHERE:
            continue
        for target, line in sorted(imported_layers(path)):
            if target in ANYWHERE or target not in rank:
                continue
            if rank[target] < rank[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target}")
    assert wrong == []


def test_the_poll_path_leaves_optional_heavy_modules_unimported() -> None:
    """Start-up is part of every poll-once (bench/results/timeline.md, "imports"): what only
    some configurations use is imported when used. cryptography (OAuth2 JWT keys, S/MIME,
    unverified TLS), pyspnego (NTLM) and the decoders' S/MIME module stay out of a fresh
    process that has imported everything a password login with raw passthrough runs."""
    code = (
        "import sys\n"
        "import connector.cli.main\n"
        "from connector.delivery import admin, transactional\n"
        "from connector.runtime import cycle, decode_pool, exactly_once, login, runner\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'spnego')"
        " or m == 'connector.decoding.smime'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
