"""Mutation check of the core: change one operator or constant at a time in a core module, run
that module's unit tests, and list the mutants no test noticed (the survivors).

A small runner of its own (no mutmut): mutants are made on the syntax tree (``ast``), one at a
time, in a copy of the committed tree (``git archive HEAD``), so the working copy is never
touched. Mutations: arithmetic operators (+ -, * /, ** *, // /), comparisons (< <=, > >=, == !=,
is / is not), ``and``/``or``, a dropped unary minus or ``not``, numeric constants (0 -> 1,
n -> n + 1, x -> 2x), ``+=``/``-=``. Docstrings and annotations are left alone.

    uv run python -m benchmarks.mutation                   # every target, 25 min budget
    uv run python -m benchmarks.mutation --budget 600 --only models/metrics.py
    uv run python -m benchmarks.mutation --skip 16                  # the mutants after the 16th
    uv run python -m benchmarks.mutation --recheck benchmarks/results/mutation.json  # survivors again

Writes benchmarks/results/mutation.json (counts per module, every survivor with its line).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# module -> the unit tests that should notice a change in it
TARGETS: dict[str, list[str]] = {
    "models/aggregation.py": ["tests/unit/test_aggregation.py", "tests/unit/test_federated.py"],
    "models/mf/als.py": ["tests/unit/test_als.py", "tests/unit/test_federated.py"],
    "models/metrics.py": ["tests/unit/test_metrics.py"],
    "models/privacy/dp.py": ["tests/unit/test_dp.py"],
}
# unit tests too slow to run once per mutant (minutes under load): utility-vs-epsilon curves
DESELECT = "not trades"

_SWAP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.Pow: ast.Mult, ast.FloorDiv: ast.Div, ast.Mod: ast.Mult,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # the index-th mutation site of the module, in tree order
    line: int
    description: str


def _skipped(tree: ast.AST) -> set[int]:
    """ids of nodes that must not be mutated: docstrings and annotations."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
        if isinstance(node, ast.arg):
            annotations.append(node.annotation)
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if annotation is not None:
                skip |= {id(n) for n in ast.walk(annotation)}
    return skip


def _sites(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """Every mutation site, in tree order: (node, what the mutation does)."""
    skip = _skipped(tree)
    out: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if (isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _SWAP) or isinstance(
            node, ast.BoolOp
        ):
            out.append((node, f"{type(node.op).__name__} -> {_SWAP[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in _SWAP:
            out.append(
                (node, f"{type(node.ops[0]).__name__} -> {_SWAP[type(node.ops[0])].__name__}")
            )
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            out.append((node, f"drop {type(node.op).__name__}"))
        elif (isinstance(node, ast.Constant) and type(node.value) in (int, float)
              and not isinstance(node.value, bool)):  # fmt: skip
            out.append((node, f"constant {node.value!r} -> {_mutated_constant(node.value)!r}"))
    return out


def _mutated_constant(value: float) -> float:
    if value == 0:
        return 1
    return value + 1 if isinstance(value, int) else value * 2


class _Apply(ast.NodeTransformer):
    def __init__(self, target: ast.AST) -> None:
        self.target = target

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        if node is not self.target:
            return node
        if isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)):
            node.op = _SWAP[type(node.op)]()
        elif isinstance(node, ast.Compare):
            node.ops = [_SWAP[type(node.ops[0])](), *node.ops[1:]]
        elif isinstance(node, ast.UnaryOp):
            return node.operand
        elif isinstance(node, ast.Constant):
            node.value = _mutated_constant(node.value)
        return node


def mutants(module: str, source: str) -> tuple[list[Mutant], ast.AST]:
    tree = ast.parse(source)
    return [
        Mutant(module, i, getattr(node, "lineno", 0), what)
        for i, (node, what) in enumerate(_sites(tree))
    ], tree


def mutated_source(tree: ast.AST, index: int) -> str:
    clone = copy.deepcopy(tree)
    node, _ = _sites(clone)[index]
    return ast.unparse(ast.fix_missing_locations(_Apply(node).visit(clone)))


def _run_tests(tree_dir: Path, tests: list[str], timeout: float) -> str:
    """'killed' (a test failed), 'survived' (all passed) or 'timeout' (counted as killed)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-m", "not slow and not realdata", "-k", DESELECT, *tests]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(tree_dir), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run(command, cwd=tree_dir, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if done.returncode == 0 else "killed"


def _snapshot(folder: Path) -> None:
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1500, help="seconds for all mutants")
    parser.add_argument("--only", action="append", help="a module of TARGETS (repeatable)")
    parser.add_argument("--test-timeout", type=float, default=180)
    parser.add_argument("--skip", type=int, default=0, help="leave out each module's first N")
    parser.add_argument("--recheck", help="a previous result: run only its survivors again")
    parser.add_argument("--out", default=str(RESULTS / "mutation.json"))
    args = parser.parse_args(argv)
    recheck = None
    if args.recheck:
        previous = json.loads(Path(args.recheck).read_text())["modules"]
        recheck = {
            (m, s["index"], s["description"]) for m, r in previous.items() for s in r["survived"]
        }
    modules = (
        args.only or sorted({m for m, _, _ in recheck}) if recheck else args.only or list(TARGETS)
    )

    started = time.monotonic()
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fedrec-mutation-") as tmp:
        tree_dir = Path(tmp)
        _snapshot(tree_dir)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        plans = {}
        for module in modules:
            source = (tree_dir / module).read_text()
            found, tree = mutants(module, source)
            if recheck is not None:
                found = [m for m in found if (module, m.index, m.description) in recheck]
            else:
                found = found[args.skip :]
            plans[module] = (source, found, tree)
            baseline = _run_tests(tree_dir, TARGETS[module], args.test_timeout)
            if baseline != "survived":
                raise SystemExit(f"{module}: the unit tests fail without any mutation ({baseline})")
        # round-robin over the modules, so a budget cut leaves every module partly covered
        lists = [plans[module][1] for module in modules]
        queue = [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]
        outcomes: dict[Mutant, str] = {}
        for mutant in queue:
            if time.monotonic() - started > args.budget:
                break
            source, _, tree = plans[mutant.module]
            target = tree_dir / mutant.module
            try:
                target.write_text(mutated_source(tree, mutant.index))
                outcomes[mutant] = _run_tests(tree_dir, TARGETS[mutant.module], args.test_timeout)
            finally:
                target.write_text(source)
            print(f"{outcomes[mutant]:9s} {mutant.module}:{mutant.line} {mutant.description}",
                  flush=True)  # fmt: skip

    for module in modules:
        tried = {m: o for m, o in outcomes.items() if m.module == module}
        report[module] = {
            "mutants": len(plans[module][1]),
            "tried": len(tried),
            "killed": sum(o in ("killed", "timeout") for o in tried.values()),
            "survived": [asdict(m) for m, o in tried.items() if o == "survived"],
            "tests": TARGETS[module],
        }
    result = {"seconds": round(time.monotonic() - started), "budget": args.budget,
              "commit": commit, "skip": args.skip, "recheck": args.recheck,
              "modules": report}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for module, r in report.items():
        print(f"{module}: {r['killed']} of {r['tried']} tried killed ({r['mutants']} mutants), "
              f"{len(r['survived'])} survived")  # fmt: skip


if __name__ == "__main__":
    main()
