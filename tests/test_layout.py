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
