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


def test_one_teacher_identity_keys_the_evaluator_and_the_report(tmp_path):
    """Each field of dinov2_patcher.teacher_identity tells two teachers apart in the evaluator's
    shared-feature key and in the report's teacher rows; a field outside it (the student's size)
    does not."""
    import argparse
    import dataclasses as dc

    import evaluate_checkpoints
    import run_experiments
    from dinov2_patcher import teacher_identity
    from helpers import tiny_config

    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"))
    args = argparse.Namespace(teacher_from_arm=None)
    changes = {"teacher_name": "vit_small_patch16_224", "teacher_img_size": 42,
               "teacher_weights": str(tmp_path / "w.pth"), "teacher_pretrained": True}
    base_ev = evaluate_checkpoints.teacher_key(cfg.model)
    base_rx = run_experiments.teacher_identity({"cfg": cfg}, args)
    for key, value in changes.items():
        other = dc.replace(cfg, model=dc.replace(cfg.model, **{key: value}))
        assert teacher_identity(other.model) != teacher_identity(cfg.model), key
        assert evaluate_checkpoints.teacher_key(other.model) != base_ev, key
        assert run_experiments.teacher_identity({"cfg": other}, args) != base_rx, key
    same = dc.replace(cfg, model=dc.replace(cfg.model, student_img_size=48))
    assert evaluate_checkpoints.teacher_key(same.model) == base_ev
