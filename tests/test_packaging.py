"""Packaging: the strategy installs and imports without the weather application's dependencies, and the core never
imports the weather subpackage (layers: weather -> strategy -> ... -> topology, data flowing one way)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import REPO_ROOT

PACKAGE = REPO_ROOT / "lightning_seqpar"
WEATHER_ONLY = ["xarray", "zarr", "netCDF4", "h5netcdf", "pandas", "jsonargparse", "platformdirs"]

_BLOCKER = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, Block())
import importlib.util
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] in BLOCKED else _find_spec(name, *a, **k)
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_strategy_imports_without_the_weather_dependencies():
    code = _BLOCKER.format(blocked=WEATHER_ONLY) + (
        "import lightning_seqpar\n"
        "from lightning_seqpar import SeqParStrategy, apply_sequence_parallel, infer_plan\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "assert 'seqpar' in StrategyRegistry, sorted(StrategyRegistry)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED or"
        " m.startswith('lightning_seqpar.weather'))\n"
        "assert not leaked, leaked\n"
        "print('core ok')\n"
    )
    result = _run(code)
    assert result.returncode == 0 and "core ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.timeout(900)
def test_weather_without_its_extra_names_the_missing_packages_and_the_install_command():
    code = _BLOCKER.format(blocked=["xarray", "pandas"]) + (
        "try:\n"
        "    import lightning_seqpar.weather.data.era5\n"
        "except ImportError as error:\n"
        "    print('ERROR:', error)\n"
        "else:\n"
        "    print('imported')\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout
    assert "ERROR:" in message, message
    assert "pandas, xarray" in message and 'lightning-seqpar[weather]' in message, message


@pytest.mark.timeout(900)
def test_the_weather_model_needs_torch_alone():
    # matplotlib is not blocked: deepspeed, a core dependency, imports it.
    code = _BLOCKER.format(blocked=WEATHER_ONLY) + (
        "from lightning_seqpar.weather.models import ClimaX\n"
        "import torch\n"
        "model = ClimaX(default_variables=['t2m', 'u10'], img_size=(8, 16), patch_size=4, embed_dim=32, depth=1,"
        " num_heads=2)\n"
        "print('model ok', tuple(model(torch.randn(1, 2, 8, 16), torch.zeros(1), ['t2m', 'u10'], ['t2m']).shape))\n"
    )
    result = _run(code)
    assert result.returncode == 0 and "model ok" in result.stdout, result.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_core_never_imports_the_weather_application():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "weather" in path.relative_to(PACKAGE).parts:
            continue
        bad = sorted(name for name in _imports(path) if name.startswith("lightning_seqpar.weather")
                     or name.split(".")[0] in WEATHER_ONLY + ["matplotlib"])
        if bad:
            offenders[str(path.relative_to(REPO_ROOT))] = bad
    assert not offenders, offenders
