"""The house rules of DESIGN.md that code can check."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import mydistill

REPO = Path(__file__).resolve().parent.parent


def test_library_never_imports_prefect():
    modules = [m.name for m in pkgutil.walk_packages(mydistill.__path__, "mydistill.")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "", f"library modules pulled in prefect: {out.stdout.strip()}"


def test_library_source_has_no_prefect_import():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "mydistill").rglob("*.py")
        if any(line.lstrip().startswith(("import prefect", "from prefect")) for line in p.read_text().splitlines())
    ]
    assert offenders == []


def test_top_level_layout():
    for name in ("flows", "tasks", "mydistill", "tests", "deploy", "pyproject.toml", "README.md", "Makefile", ".ci/run"):
        assert (REPO / name).exists(), name


def test_config_imports_no_torch():
    # validating a config (the CLI, `prefect deploy`, the UI's form) must not pay for torch
    code = "import sys, mydistill.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# the library's own import graph (every import, lazy ones inside functions too)

# Floors of the library, bottom first: a module may import its own floor and the floors below,
# never one above. (The Prefect floors, tasks/ and flows/, sit above all of these.)
FLOORS = [
    {"config"},
    {"io", "environment", "progress", "debris", "fingerprint", "lineage", "tokenization", "models", "openai_client", "block_importance", "storage"},
    {"losses", "generation", "signal", "mix", "tracking"},
    {"training", "train"},
    {"evaluation"},
    {"stage_functions", "pipeline", "demo"},
]


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of mydistill it imports}``, read from the source (``ast``), relative and
    lazy imports included; a name imported from a package counts as its submodule when it is one."""
    import ast

    modules: dict[str, Path] = {}
    for path in (REPO / "mydistill").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                found = known(target) if target.startswith("mydistill") else None
                if found and found != name:
                    graph[name].add(found)
    return graph


def floor_of(module: str) -> int:
    room = module.split(".")[1] if "." in module else "__init__"
    if room == "__init__":
        return -1  # the package face: version, the moved-module aliases
    for i, floor in enumerate(FLOORS):
        if room in floor:
            return i
    raise AssertionError(f"{module} is on no floor of tests/test_layout.py's FLOORS: give its room one")


def test_no_upward_import():
    upward = sorted(
        f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
        for a, targets in import_graph().items() for b in targets
        if floor_of(b) > floor_of(a) and floor_of(a) >= 0
    )
    assert upward == []


def test_no_import_cycle():
    graph = import_graph()
    # a package's face re-exports its modules: the edge from a module up to its own package's face is not a cycle
    graph = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_root_holds_few_modules():
    root = sorted(p.stem for p in (REPO / "mydistill").glob("*.py") if p.stem != "__init__")
    assert len(root) <= 12, root  # about 10: shared helpers, the recipe (train) and one stage (mix)


def test_library_never_imports_tasks_or_flows():
    graph_text = [
        str(p.relative_to(REPO)) for p in (REPO / "mydistill").rglob("*.py")
        if any(line.lstrip().startswith(("import tasks", "from tasks", "import flows", "from flows"))
               for line in p.read_text().splitlines())
    ]
    assert graph_text == []


def test_modules_moved_into_packages_still_import_by_their_old_names():
    import importlib

    from mydistill import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new)
