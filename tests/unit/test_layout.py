"""The layout's import rules (DESIGN.md), checked on the source: Hydra stays at the edge
(only jobs/ import hydra or omegaconf), models never reach into torch.distributed or the
training code, objectives and data never depend on the trainer, and nothing in the
library imports from jobs/."""
import ast
import os

import pytest

from tests.conftest import ROOT

LIB = os.path.join(ROOT, "platform", "tidal")

# (package under platform/tidal, module prefixes it must not import)
RULES = [
    ("", ("hydra", "omegaconf", "jobs")),
    ("models", ("torch.distributed", "tidal.train", "tidal.parallel", "ray")),
    ("objectives", ("tidal.train", "tidal.parallel", "ray")),
    ("data", ("tidal.train", "tidal.objectives", "torch.distributed")),
    ("config", ("ray", "tidal.parallel", "tidal.objectives", "tidal.models")),
    ("parallel", ("tidal.train",)),
]


def imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def modules(package):
    root = os.path.join(LIB, package)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


@pytest.mark.parametrize("package,forbidden", RULES, ids=[r[0] or "tidal" for r in RULES])
def test_import_rules(package, forbidden):
    found = [f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
             for path in modules(package) for line, name in imports(path)
             if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not found, "\n".join(found)


def test_the_rules_see_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom torch.distributed import all_reduce\n")
    assert ("torch.distributed", 2) in {(n, l) for l, n in imports(str(bad))}


def test_training_functions_read_in_one_screen():
    """No function in train/ is longer than 60 lines (DESIGN.md: loops that read top to
    bottom; split the set-up out instead)."""
    long = []
    for path in modules("train"):
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
