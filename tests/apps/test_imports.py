"""Every module of the package imports on its own in a fresh interpreter.

Scripts import whichever module they need first (bench/bench_cellops.py starts at ldeq_fast.ops.heatmap), so
an import cycle that only bites from one entry point would pass every test that happens to import the
package in another order.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import ldeq_fast

ROOT = pathlib.Path(ldeq_fast.__file__).resolve().parent
# modules that exist to bridge an optional package: checked only where that package is installed
OPTIONAL = {"ldeq_fast.compat.torchdeq": "torchdeq"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("ldeq_fast",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in OPTIONAL or importlib.util.find_spec(OPTIONAL[name]) is not None:
            yield name


def test_every_module_imports_first():
    modules = list(_modules())
    assert "ldeq_fast.ops.heatmap" in modules and "ldeq_fast.model.ldeq" in modules
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    failures, pending = {}, list(modules)
    running = []
    while pending or running:
        while pending and len(running) < max(2, os.cpu_count() or 1):
            name = pending.pop()
            running.append((name, subprocess.Popen([sys.executable, "-c", f"import {name}"], env=env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        name, proc = running.pop(0)
        err = proc.communicate(timeout=300)[1]
        if proc.returncode != 0:
            failures[name] = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
    assert not failures, f"modules that fail to import first: {failures}"


def test_the_library_never_imports_the_command_line():
    """ldeq_fast.cli and ldeq_fast.apps (argument parsing, printing) sit on top of the library: no library
    module imports them, at module level or inside a function."""
    import ast

    cli = ("ldeq_fast.cli", "ldeq_fast.apps")
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "apps" or rel.name == "cli.py" and len(rel.parts) == 1:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{rel}: {n}" for n in names if n == cli[0] or n == cli[1] or n.startswith(cli[1] + ".")]
    assert not offenders, offenders
