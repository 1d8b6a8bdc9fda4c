"""Nothing fedrec runs unpickles data or executes a stored model: a scan of its own code.

``np.load`` must say ``allow_pickle=False``; pickle-based readers (``pickle``, ``cloudpickle``,
``joblib``, ``pandas.read_pickle``, ``torch.load``) are not used; and ``mlflow.pyfunc.load_model``,
which executes the Python file stored with a model, is not called by fedrec's own paths.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "tasks", "flows", "fedrec")
UNPICKLING_MODULES = {"pickle", "cloudpickle", "joblib", "dill", "shelve", "marshal"}
FORBIDDEN_CALLS = {"read_pickle", "torch.load", "pyfunc.load_model"}


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        where = f"{shown}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            found += [
                f"{where} imports {n}" for n in names if n and n.split(".")[0] in UNPICKLING_MODULES
            ]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if any(name == f or name.endswith("." + f) for f in FORBIDDEN_CALLS):
            found.append(f"{where} calls {name}")
        if name in ("np.load", "numpy.load"):
            keywords = {k.arg: k.value for k in node.keywords}
            flag = keywords.get("allow_pickle")
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"{where} calls {name} without allow_pickle=False")
    return found


def test_fedrec_code_never_unpickles_nor_loads_a_model_by_running_its_code():
    offences = [o for path in _sources() for o in _offences(path)]

    assert offences == []


@pytest.mark.parametrize(
    ("code", "expected"),
    [("np.load(p)", "without allow_pickle=False"), ("np.load(p, allow_pickle=True)", "without"),
     ("import pickle", "imports pickle"), ("mlflow.pyfunc.load_model(u)", "calls mlflow.pyfunc"),
     ("pd.read_pickle(p)", "calls pd.read_pickle")],
)  # fmt: skip
def test_the_scan_catches_each_pattern(tmp_path, code, expected):
    path = tmp_path / "probe.py"
    path.write_text(code + "\n")

    offences = _offences(path)

    assert len(offences) == 1 and expected in offences[0]
