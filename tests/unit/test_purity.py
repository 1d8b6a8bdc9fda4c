"""The core stays pure: models/ must not import Prefect or MLflow, directly or indirectly."""

import ast
import subprocess
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_no_module_in_models_imports_prefect_or_mlflow():
    offenders = []
    for path in MODELS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in {"prefect", "mlflow"}
            ]
    assert offenders == []


def test_importing_the_core_loads_neither_prefect_nor_mlflow():
    code = (
        "import sys, pkgutil, importlib, models\n"
        "for m in pkgutil.walk_packages(models.__path__, 'models.'): importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'mlflow')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=MODELS.parent
    )
    assert out.stdout.strip() == "[]"
