"""The import structure of docs/DESIGN.md: layers whose imports only point down, no cycles (import-linter's
contracts in pyproject.toml, which see imports inside functions too), and modules small enough to read."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "lampseg"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80  # a function reads in one sitting (the training loop included)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contracts, importing ``lampseg`` from ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as main; "
               "sys.exit(main())", "--no-cache", "--no-logo", str(REPO / "pyproject.toml")]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120, env=env)


def test_every_contract_is_kept():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("module,upward", [
    ("data/sampling.py", "from lampseg.engine.train import run"),  # data must not know the engine
    ("planner/plan.py", "    from lampseg.engine.setup import load_data\n"),  # not even inside a function
    ("runtime/device.py", "import lampseg.model.unet"),
])
def test_an_upward_import_breaks_the_layers_contract(tmp_path, module, upward):
    copy = tmp_path / "lampseg"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / module
    source = path.read_text()
    if upward.startswith("    "):  # inside the first function of the module
        head, tail = source.split("\ndef ", 1)
        name, rest = tail.split("\n", 1)
        source = f"{head}\ndef {name}\n{upward}{rest}"
    else:
        source = source.replace("from __future__ import annotations\n",
                                f"from __future__ import annotations\n\n{upward}\n", 1)
    path.write_text(source)
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    importer = "lampseg." + module.removesuffix(".py").replace("/", ".")
    assert "BROKEN" in proc.stdout and importer in proc.stdout, proc.stdout


def test_modules_stay_short():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_long():
    """Every function, method and nested function of the package, the training loop's included, is at most
    ``MAX_FUNCTION_LINES`` lines from its ``def`` (decorators aside) to its last line, docstring included."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _import_group(lines: list[str], index: int) -> list[str]:
    """The lines of the import at ``lines[index]``, the imports and blank lines around it, and the line just
    above them (where a comment explaining the group would be)."""
    def is_import(line: str) -> bool:
        stripped = line.strip()
        return not stripped or stripped.startswith(("import ", "from ", ")")) or stripped.endswith(",")

    lo = index
    while lo > 0 and is_import(lines[lo - 1]):
        lo -= 1
    hi = index
    while hi + 1 < len(lines) and is_import(lines[hi + 1]) and lines[hi + 1].strip():
        hi += 1
    return lines[max(lo - 1, 0):hi + 1]


def test_function_local_imports_say_why():
    """An import inside a function must buy start-up time (or be timed) and say so: a comment on the
    import group or on the line above it. Anything else belongs at the top of the module."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for function in [n for n in ast.walk(ast.parse("\n".join(lines)))
                         if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    if not any("#" in line for line in _import_group(lines, node.lineno - 1)):
                        unexplained.append(f"{path.relative_to(REPO)}:{node.lineno}: "
                                           f"{lines[node.lineno - 1].strip()}")
    assert not unexplained, "function-local imports without a reason:\n" + "\n".join(sorted(set(unexplained)))


def _imported(command: list[str]) -> set[str]:
    """The modules a Python command imports (``-X importtime``), whatever its exit status."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines}


def test_a_typo_is_reported_without_importing_the_heavy_stack(tmp_path):
    """Everything `python -m lampseg` imports before Hydra reports a bad override: seconds, not the ten more
    that MONAI, Ray and the pipelining engine would add."""
    imported = _imported(["-m", "lampseg", "train", "trainer.max_epoch=3", f"run_dir={tmp_path}"])
    assert {"lampseg.config", "lampseg.runtime.distributed", "lampseg.tune.loopback"} <= imported
    assert not imported & {"monai", "ray", "matplotlib", "torch.distributed.pipelining"}


def test_a_run_that_is_not_pipelined_does_not_import_the_pipelining_engine():
    imported = _imported(["-c", "import lampseg.engine.train"])
    assert "lampseg.engine.train" in imported
    assert not imported & {"torch.distributed.pipelining", "ray"}


def test_every_package_is_installed():
    """A package missing from pyproject's ``packages`` works in an editable install, and not from a wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    conf = {".".join(("lampseg", "conf", *p.relative_to(REPO / "conf").parts))
            for p in (REPO / "conf").rglob("*") if p.is_dir() and p.name != "__pycache__"} | {"lampseg.conf"}
    missing = sorted((found | conf) - listed)
    assert not missing, f"packages missing from pyproject.toml's [tool.setuptools] packages: {missing}"


def test_only_the_entry_points_and_the_builder_validate():
    """``validate`` runs where a config is made (``config``: ``load``, ``derive``) and in the run builder
    (for a config handed in unchecked); everything else reads checked configs."""
    callers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "validate":
                callers.add(str(path.relative_to(PACKAGE)))
    allowed = {"config/loading.py", "config/derived.py", "engine/build.py"}
    assert callers and callers <= allowed, f"validate called outside {sorted(allowed)}: {callers - allowed}"


def test_validate_runs_once_per_command(tmp_path, monkeypatch):
    """``python -m lampseg train``: checked once before any work; the trainer reads that checked config."""
    import lampseg.config.derived
    import lampseg.config.loading
    import lampseg.engine.build
    from lampseg.__main__ import main
    from lampseg.config.checks import validate

    calls = []

    def counted(cfg) -> None:
        calls.append(str(cfg.run_dir))
        validate(cfg)

    for module in (lampseg.config.derived, lampseg.config.loading, lampseg.engine.build):
        monkeypatch.setattr(module, "validate", counted)
    monkeypatch.setattr(sys, "argv", ["lampseg"])
    main(["train", "+exp=smoke", "trainer.max_epochs=1", f"run_dir={tmp_path}"])
    assert (tmp_path / "summary.json").is_file()
    assert len(calls) == 1, calls
