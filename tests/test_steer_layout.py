"""steer/ shows its architecture: each sub-package imports only the layers below it, and the package exposes a
small public API. A newcomer reads the layers bottom-up: fusion -> streams -> downlink -> cloud -> engine."""

import ast
from pathlib import Path

import pocketlm.steer as steer

STEER = Path(steer.__file__).parent
LAYERS = ["fusion", "streams", "downlink", "cloud"]  # each may import the ones before it, never after


def _steer_imports(path: Path) -> set[str]:
    """The steer sub-packages a module imports (relative imports resolved against its package)."""
    pkg = path.parent.relative_to(STEER).parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(pkg)[: len(pkg) - (node.level - 1)] if node.level > 1 else list(pkg)
            if len(pkg) - (node.level - 1) < 0:
                continue  # above steer/
            parts = base + (node.module.split(".") if node.module else [])
            if parts:
                out.add(parts[0])
    return out


def test_sub_packages_import_only_the_layers_below():
    for i, layer in enumerate(LAYERS):
        allowed = set(LAYERS[: i + 1])
        for path in (STEER / layer).glob("*.py"):
            bad = {m for m in _steer_imports(path) if m in LAYERS or m.endswith(".py")} - allowed
            assert not bad, f"{path.relative_to(STEER)} imports {bad} (above its layer {layer!r})"


def test_no_sub_package_imports_the_engine():
    top = {p.stem for p in STEER.glob("*.py")} - {"__init__"}
    for layer in LAYERS:
        for path in (STEER / layer).glob("*.py"):
            assert not (_steer_imports(path) & top), f"{path.relative_to(STEER)} imports the engine layer"


def test_the_public_api_is_small_and_importable():
    assert len(steer.__all__) <= 16
    for name in steer.__all__:
        assert getattr(steer, name) is not None
