"""The package's layers (docs/concepts.md, "The layers"): imports only point down or sideways, never up.

weather -> strategies -> engines -> parallelize -> plan -> attention -> comm -> topology. A module may import
modules of its own layer or of lower layers; an import of a higher layer (an arrow back up) fails this test with the
file and the import.
"""

from __future__ import annotations

import ast

from tests.dist_utils import REPO_ROOT

PACKAGE = REPO_ROOT / "lightning_seqpar"

#: Top-level module or subpackage of lightning_seqpar -> its layer, lowest first (the table in docs/concepts.md).
LAYERS = {
    "parallel_dims": 0, "topology": 0,
    "comm": 1,
    "attention": 2,
    "plan": 3, "adapters": 3, "wrapping": 3, "memory": 3,
    "parallelize": 4, "tensor_parallel": 4, "fsdp": 4,
    "deepspeed_engine": 5, "pipeline": 5, "pipeline_auto": 5, "pipeline_stages": 5, "relayout": 5,
    "consolidate": 5,
    "sampling": 6, "reliability": 6, "resumable": 6, "failures": 6,
    "strategies": 7, "strategy": 7,
    "__init__": 8,
    "weather": 9,
}


def _layer_of(dotted: str) -> tuple[str, int]:
    parts = dotted.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    assert name in LAYERS, f"lightning_seqpar.{name} has no layer: add it to LAYERS here and to docs/concepts.md"
    return name, LAYERS[name]


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("lightning_seqpar"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "lightning_seqpar":  # `from lightning_seqpar import pipeline`: the submodules named
                for alias in node.names:
                    submodule = PACKAGE / f"{alias.name}.py"
                    subpackage = PACKAGE / alias.name / "__init__.py"
                    is_module = submodule.exists() or subpackage.exists()
                    yield f"lightning_seqpar.{alias.name}" if is_module else "lightning_seqpar"
            elif node.module.startswith("lightning_seqpar."):
                yield node.module


def test_every_module_has_a_layer():
    names = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert names == set(LAYERS), f"missing: {sorted(names - set(LAYERS))}, stale: {sorted(set(LAYERS) - names)}"


def test_imports_never_point_up():
    up = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(REPO_ROOT).with_suffix("")
        source, source_layer = _layer_of(".".join(relative.parts))
        for target in _imports(path):
            name, layer = _layer_of(target)
            if layer > source_layer:
                where = f"{path.relative_to(REPO_ROOT)} (layer {source_layer}, {source})"
                up.append(f"{where} imports {target} (layer {layer})")
    assert not up, "imports that point up a layer:\n" + "\n".join(up)
