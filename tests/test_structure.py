"""The module graph a newcomer can hold in their head: no import circle among the top-level modules,
and no module reaching into another's private (underscore) names."""
from __future__ import annotations

import ast
import glob
import os

from helpers import REPO

MODULES = {
    os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(REPO, "*.py"))
}


def imports(path: str):
    """(module, names) for every import of a repo module anywhere in the file (type-checking and
    function-level imports included: a circle hidden in a function is still a circle)."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES and not node.level:
            yield node.module, [alias.name for alias in node.names]


def test_no_import_circle():
    graph = {name: {m for m, _ in imports(path)} - {name} for name, path in MODULES.items()}
    visiting, done, circles = [], set(), []

    def visit(name):
        if name in visiting:
            circles.append(visiting[visiting.index(name):] + [name])
            return
        if name in done:
            return
        visiting.append(name)
        for other in sorted(graph[name]):
            visit(other)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert not circles, [" -> ".join(c) for c in circles]


def test_no_module_imports_another_modules_private_names():
    private = [f"{os.path.basename(path)}: from {module} import {name}"
               for path in MODULES.values() for module, names in imports(path)
               for name in names if name.startswith("_")]
    assert not private, private
