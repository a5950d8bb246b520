"""The docs tell the truth about the code: the layer picture is drawn from it (``docs/layers.py``), every
module, path and test the docs name exists, and docs/DESIGN.md's layout names every package and module of
``lampseg`` as pyproject.toml's layers contract orders them. Everything is read from the tree, not listed
here: moving a module breaks the doc that still names its old place, not this file."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "lampseg"
DOCS = REPO / "docs"
DESIGN = DOCS / "DESIGN.md"
sys.path.insert(0, str(DOCS))
from layers import contract_layers  # noqa: E402  (docs/layers.py: the contract's rows, as the picture reads them)

PATH = re.compile(r"(?<![\w./~-])(lampseg/[\w/.-]*\w|(?:[\w.-]+/)+\w+\.py\b)")
BARE_FILE = re.compile(r"(?<![\w./~-])(\w+\.py)\b")
MODULE = re.compile(r"(?<![\w./-])lampseg(?:\.\w+)+")
PLACEHOLDER = re.compile(r"^[A-Z_]+$")  # bench/NAME.py


def top_level() -> list[str]:
    """lampseg's packages (directories with ``__init__.py``) and modules."""
    packages = [p.parent.name for p in PACKAGE.glob("*/__init__.py")]
    return sorted(packages + [p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"])


def packages() -> list[str]:
    """Every package under lampseg, at any depth, as ``a`` or ``a/b``."""
    return sorted(str(p.parent.relative_to(PACKAGE)) for p in PACKAGE.rglob("__init__.py")
                  if p.parent != PACKAGE)


def section(text: str, heading: str) -> str:
    """The body of the ``## heading...`` section of a markdown text."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section '## {heading}'"
    return match.group(1)


@cache
def file_names() -> set[str]:
    roots = [PACKAGE, REPO / "tests", DOCS, REPO / "conf", REPO / "launch", REPO / "notebooks"]
    return {p.name for root in roots if root.is_dir() for p in root.rglob("*.py")}


def defines(module: Path, name: str) -> bool:
    """Whether ``name`` is bound at the top level of a module (def, class, assignment or import)."""
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(getattr(t, "id", "") == name
                                                                 for t in targets):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.split(".")[0]) == name for a in node.names):
            return True
    return False


def module_exists(dotted: str) -> bool:
    """``lampseg.a.b`` is a module or package, or ``lampseg.a.b.name`` a name defined in one."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:end])
        found = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if found.is_file():
            return end == len(parts) or defines(found, parts[end])
    return False


def broken_references(text: str) -> list[str]:
    """Paths, file names and ``lampseg.`` modules a text names that are not in the tree."""
    broken = []
    for path in {m.rstrip(".") for m in PATH.findall(text)}:
        if any(PLACEHOLDER.match(part) for part in Path(path).with_suffix("").parts):
            continue
        if not any((root / path).exists() for root in (REPO, PACKAGE)):
            broken.append(path)
    broken += [name for name in set(BARE_FILE.findall(text)) if name not in file_names()]
    # ``lampseg.x`` with no module x is a result's key (BENCHMARKS.md's ``lampseg.step_s_median``)
    dotted = [m for m in set(MODULE.findall(text)) if m.count(".") > 1 or m.split(".")[1] in top_level()]
    broken += [m for m in dotted if not module_exists(m)]
    return sorted(broken)


def layout_rows(design: str) -> list[tuple[list[str], str]]:
    """DESIGN's layout block as (layer names, the row's text), top first: a row starts at column 0 with
    ``a | b`` and two spaces, its continuation lines are indented."""
    block = re.search(r"```\n(.*?)```", section(design, "Layout"), re.S)
    assert block, "no layout block in DESIGN.md's Layout section"
    rows: list[tuple[list[str], str]] = []
    for line in block.group(1).splitlines():
        if line and not line[0].isspace():
            names, _, rest = line.partition("  ")
            rows.append(([n.strip() for n in names.split("|")], rest))
        elif rows:
            rows[-1] = (rows[-1][0], rows[-1][1] + "\n" + line)
    return rows


def layout_problems(design: str) -> list[str]:
    """What DESIGN's layout gets wrong: its rows are not the layers contract's, a package is not named in
    the Layout section, or a row names a file its packages do not have."""
    rows = layout_rows(design)
    problems = []
    if [names for names, _ in rows] != contract_layers():
        problems.append(f"rows {[names for names, _ in rows]} != pyproject's layers {contract_layers()}")
    text = section(design, "Layout")
    named = {n for names, _ in rows for n in names}
    problems += [f"{name} not a row" for name in top_level() if name not in named]
    problems += [f"package {p} not named" for p in packages() if "/" in p and p not in text]
    for names, body in rows:
        for path in set(re.findall(r"(?<![\w.-])((?:\w+/)*\w+\.py)\b", body)):
            if not PLACEHOLDER.match(Path(path).stem) and not any(
                    (PACKAGE / root / path).is_file() or (PACKAGE / path).is_file() for root in names):
                problems.append(f"{path} is in none of {names}")
    return problems


def unlisted_tests(design: str) -> list[str]:
    """Test files missing from DESIGN's list of tests, and names there with no file."""
    listed = set(re.findall(r"\btest_\w+", section(design, "Tests")))
    files = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    return sorted([f"{n} (not listed)" for n in files - listed] + [f"{n} (no file)" for n in listed - files])


def test_the_layer_picture_is_drawn_from_the_code(tmp_path):
    out = tmp_path / "layers.svg"
    proc = subprocess.run([sys.executable, str(DOCS / "layers.py"), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 against the layers" in proc.stdout, proc.stdout
    svg = out.read_text()
    assert svg.startswith("<?xml") and "</svg>" in svg
    assert sorted(re.findall(r'id="box-(\w+)"', svg)) == top_level()


def test_the_committed_picture_has_every_box_and_design_shows_it():
    """``python docs/layers.py docs/layers.svg`` after adding, moving or removing a package or module."""
    svg = (DOCS / "layers.svg").read_text()
    redraw = "redraw it: python docs/layers.py docs/layers.svg"
    assert sorted(re.findall(r'id="box-(\w+)"', svg)) == top_level(), redraw
    assert "(layers.svg)" in DESIGN.read_text()


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")) + ["../README.md"])
def test_every_path_and_module_named_in_the_docs_exists(doc):
    assert broken_references((DOCS / doc).read_text()) == []


def test_design_layout_is_the_layers_contract_and_names_every_package():
    assert layout_problems(DESIGN.read_text()) == []


def test_design_lists_every_test_file():
    assert unlisted_tests(DESIGN.read_text()) == []


def test_each_check_can_fail():
    design = DESIGN.read_text()
    assert broken_references("see `lampseg/engine/inference_memory.py` and lampseg.parallel.blocks") == [
        "lampseg.parallel.blocks", "lampseg/engine/inference_memory.py"]
    assert broken_references("`engine/inference_memory.py`, `inference_memory.py`, lampseg.config.nothing") \
        == ["engine/inference_memory.py", "inference_memory.py", "lampseg.config.nothing"]
    assert broken_references("lampseg.config.load, lampseg.engine.train.run, `tests/test_docs.py`") == []
    first, last = (" | ".join(names) for names in (layout_rows(design)[0][0], layout_rows(design)[-1][0]))
    dropped = re.sub(rf"^{re.escape(first)}", first.split(" | ")[0], design, count=1, flags=re.M)
    assert any(p.startswith("rows") for p in layout_problems(dropped))
    moved = re.sub(rf"^{re.escape(last)}", f"{last}  nowhere.py", design, count=1, flags=re.M)
    assert f"nowhere.py is in none of {last.split(' | ')}" in layout_problems(moved)
    name = sorted((REPO / "tests").glob("test_*.py"))[0].stem
    assert f"{name} (not listed)" in unlisted_tests(design.replace(f"`{name}`", ""))
    extra = design.replace("## Tests\n", "## Tests\n`test_nothing`")
    assert "test_nothing (no file)" in unlisted_tests(extra)
