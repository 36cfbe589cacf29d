"""Dependencies run one way: numerics → quant decisions → passes → export/validate → targets → pipeline → api → cli.

Every ``import`` in edgeq and the targets (module level and inside functions) is read from the
source; a module may import only modules of its own layer or below.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module prefix, layer): the longest matching prefix decides
LAYERS = {
    "edgeq": 0,  # the package itself: errors, specs, meta, graph, onnx_io, runtime, sources, plugins, _quiet
    "edgeq.validate.metrics": 0,  # pure numerics, used by the exporter's check
    "edgeq.quant": 1,
    "edgeq.passes": 2,
    "edgeq.export": 3,
    "edgeq.validate": 4,
    "edgeq.report": 4,
    "targets": 5,
    "edgeq.pipeline": 6,
    "edgeq.generate": 4,  # a generation loop over runners; LLM validation uses it
    "edgeq.api": 7,
    "edgeq.doctor": 7,
    "edgeq.cli": 8,
    "edgeq.__main__": 8,
}
# the lazy package namespace (edgeq/__init__.py resolves edgeq.export/quantize/validate on use)
LAZY_PACKAGE = "edgeq"


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(module)
    return LAYERS[best]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from edgeq import api` imports edgeq.api; `from edgeq.x import y` imports edgeq.x
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if (ROOT / Path(*f"{node.module}.{a.name}".split("."))).with_suffix(".py").exists()
                       or (ROOT / Path(*f"{node.module}.{a.name}".split("."))).is_dir())
    return {m for m in out if m.split(".")[0] in ("edgeq", "targets")}


def _sources():
    return sorted([*ROOT.glob("edgeq/**/*.py"), *ROOT.glob("targets/**/*.py")])


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    name = _module_name(path)
    here = layer(name)
    upward = sorted(m for m in _imports(path) if m != LAZY_PACKAGE and layer(m) > here)
    assert not upward, f"{name} (layer {here}) imports {', '.join(f'{m} (layer {layer(m)})' for m in upward)}"


def test_quant_never_imports_passes():
    """The decisions do not know how they are applied (the cycle this layering removed)."""
    for path in ROOT.glob("edgeq/quant/*.py"):
        assert not [m for m in _imports(path) if m.startswith("edgeq.passes")], path
