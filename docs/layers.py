"""Draw lampseg's layers from the code: ``python docs/layers.py docs/layers.svg``.

One row per layer of the ``layers`` contract in ``pyproject.toml`` (import-linter's, top to bottom; ``a | b``
are siblings in one row), one box per package or module with its lines of code (a package's box lists its
modules), and one arrow per pair of boxes with the number of module-to-module imports between them (grimp's
graph: the imports import-linter checks, those inside functions too). An arrow that points up or sideways
breaks the contract and is drawn red, as is a package or module in no layer (a last row); ``lint-imports``
fails on both, and so does this script. The output has no dates and fixed
ids (``svg.hashsalt``), so it changes only when the code does.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import grimp
import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lampseg"
WIDTH, ROW, BOX_H = 16.0, 1.4, 0.72  # inches: figure width, row pitch, box height
DOWN, UP = "#5b6b7f", "#d62728"


def contract_layers(pyproject: Path = REPO / "pyproject.toml") -> list[list[str]]:
    """The top-level ``layers`` contract's rows, top first, each a list of sibling names."""
    config = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c.get("id") == "layers")
    return [[name.strip(" ()") for name in row.replace(":", "|").split("|")] for row in contract["layers"]]


def components() -> list[str]:
    """lampseg's packages (directories with ``__init__.py``) and modules, as on disk."""
    root = REPO / PACKAGE
    return sorted([p.parent.name for p in root.glob("*/__init__.py")]
                  + [p.stem for p in root.glob("*.py") if p.stem != "__init__"])


def lines_of(name: str) -> dict[str, int]:
    """Lines of each file of top-level component ``name``: ``{"": n}`` for a module, ``{file: n}`` for a
    package (``__init__.py`` counted only when it has code)."""
    root = REPO / PACKAGE
    if (root / f"{name}.py").exists():
        return {"": len((root / f"{name}.py").read_text().splitlines())}
    files = sorted((root / name).rglob("*.py"))
    counts = {str(p.relative_to(root / name).with_suffix("")): len(p.read_text().splitlines()) for p in files}
    return {k: v for k, v in counts.items() if v > 0}


def component(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def imports_between(graph) -> Counter:
    """``(importer, imported)`` top-level components -> number of module-to-module imports."""
    counts: Counter = Counter()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            a, b = component(importer), component(imported)
            if a and b and a != b:
                counts[a, b] += 1
    return counts


def layout(rows: list[list[str]], sizes: dict[str, int]) -> dict[str, tuple[float, float, float]]:
    """Each box's (x, y, width): rows top to bottom, widths by lines of code within a row (not below a
    readable minimum), each row centred."""
    boxes, gap = {}, 0.25
    largest = max(sum(sizes[n] for n in row) for row in rows)
    for r, row in enumerate(rows):
        total = sum(sizes[n] for n in row)
        room = (WIDTH - 0.6 - gap * (len(row) - 1)) * max(0.35, (total / largest) ** 0.5)
        widths = [max(2.0, room * sizes[n] / total) for n in row]
        x = (WIDTH - sum(widths) - gap * (len(row) - 1)) / 2
        for name, w in zip(row, widths):
            boxes[name] = (x, (len(rows) - 1 - r) * ROW + 0.6, w)
            x += w + gap
    return boxes


def module_text(files: dict[str, int], width: float) -> str:
    """A package's modules, largest first, ``name lines`` wrapped to the box's width."""
    words = [f"{k} {v}" for k, v in sorted(files.items(), key=lambda kv: (-kv[1], kv[0])) if k != "__init__"]
    lines, line, limit = [], "", int(width * 17)
    for word in words:
        if line and len(line) + len(word) + 3 > limit:
            lines.append(line)
            line = ""
        line = f"{line}  ·  {word}" if line else word
    return "\n".join([*lines, line][:3])


def draw(out: Path) -> dict:
    rows = contract_layers()
    unlayered = [name for name in components() if all(name not in row for row in rows)]
    rows += [unlayered] if unlayered else []  # the contract is exhaustive: lint-imports fails on these too
    files = {name: lines_of(name) for row in rows for name in row}
    sizes = {name: sum(f.values()) for name, f in files.items()}
    level = {name: r for r, row in enumerate(rows) for name in row}
    counts = imports_between(grimp.build_graph(PACKAGE, cache_dir=None))
    boxes = layout(rows, sizes)
    height = len(rows) * ROW + 1.3
    fig = Figure(figsize=(WIDTH, height))  # no pyplot: importing this module changes no global state
    ax = fig.add_axes((0, 0, 1, 1), xlim=(0, WIDTH), ylim=(0, height))
    ax.axis("off")
    for name, (x, y, w) in boxes.items():
        package = "" not in files[name]
        edge = {"ec": UP, "lw": 2} if name in unlayered else {"ec": "#34495e", "lw": 1}
        ax.add_patch(FancyBboxPatch((x, y), w, BOX_H, boxstyle="round,pad=0,rounding_size=0.06",
                                    fc="#dbe6f1" if package else "#eef2f6", zorder=3, **edge))
        ax.text(x + 0.08, y + BOX_H - 0.08, f"{name}/" if package else f"{name}.py", ha="left", va="top",
                fontsize=11, fontweight="bold", zorder=4, gid=f"box-{name}")  # the svg's id="box-NAME"
        ax.text(x + w - 0.08, y + BOX_H - 0.08, f"{sizes[name]:,}", ha="right", va="top", fontsize=9,
                zorder=4)
        if package:
            ax.text(x + 0.08, y + BOX_H - 0.34, module_text(files[name], w), ha="left", va="top",
                    fontsize=6.5, color="#34495e", linespacing=1.35, zorder=4)
    # arrows pass under the boxes they skip; each box's arrow ends are spread along its bottom (outgoing)
    # and top (incoming) edge, ordered by the box at the other end
    edges = sorted(counts, key=lambda e: (level[e[0]], level[e[1]], e))
    ends: dict[tuple[str, str], list] = {}
    for name, (x, y, w) in boxes.items():
        out_edges = sorted((e for e in edges if e[0] == name), key=lambda e: (boxes[e[1]][0], e))
        in_edges = sorted((e for e in edges if e[1] == name), key=lambda e: (boxes[e[0]][0], e))
        for i, e in enumerate(out_edges):
            ends.setdefault(e, [None, None])[0] = (x + w * (i + 1) / (len(out_edges) + 1), y)
        for i, e in enumerate(in_edges):
            ends.setdefault(e, [None, None])[1] = (x + w * (i + 1) / (len(in_edges) + 1), y + BOX_H)
    upward = []
    for e in edges:
        start, end = ends[e]
        bad = level[e[1]] <= level[e[0]] or bool({*e} & {*unlayered})
        if bad:
            upward.append(e)
        if level[e[1]] < level[e[0]]:  # up: from the importer's top to the imported box's bottom
            start, end = (start[0], start[1] + BOX_H), (end[0], end[1] - BOX_H)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, shrinkA=0, shrinkB=1,
                                     color=UP if bad else DOWN, alpha=0.9 if bad else 0.45,
                                     lw=0.6 + 0.35 * min(counts[e], 12) ** 0.5, zorder=5 if bad else 2))
        t = min(0.5, 0.22 / max(abs(start[1] - end[1]), 0.01))  # the count just below the importer's box
        mx, my = start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t
        ax.text(mx, my, str(counts[e]), fontsize=6, ha="center", va="center", color=UP if bad else "#222",
                bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.85}, zorder=6)
    lines = sum(sizes.values())
    modules = sum(len(f) for f in files.values())
    ax.text(0.3, height - 0.25, f"{PACKAGE}: {len(boxes)} packages and modules in {len(rows)} layers, "
            f"{modules} files, {lines:,} lines", fontsize=13, fontweight="bold", va="top")
    against = len(upward) + len(unlayered)
    ax.text(0.3, height - 0.55, "Rows: pyproject.toml's import-linter contract \"layers\", top to bottom: an "
            "import only points down. Number in a box: its lines of code. Arrows: imports between boxes "
            "(module pairs, inside functions too).\nRed: an arrow against the layers (up or sideways) or a "
            f"box in no layer; {against} here. Drawn by docs/layers.py from the code.", fontsize=8.5,
            va="top", color="#34495e", linespacing=1.5)
    with matplotlib.rc_context({"svg.hashsalt": "lampseg-layers", "svg.fonttype": "none"}):
        fig.savefig(out, metadata={"Date": None, "Creator": None})
    return {"boxes": len(boxes), "arrows": len(edges), "upward": upward, "unlayered": unlayered}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "docs" / "layers.svg")
    result = draw(target)
    print(f"wrote {target}: {result['boxes']} boxes, {result['arrows']} arrows, "
          f"{len(result['upward'])} against the layers {result['upward'] or ''}"
          + (f"; not in the layers contract: {result['unlayered']}" if result["unlayered"] else ""))
    sys.exit(1 if result["upward"] or result["unlayered"] else 0)
