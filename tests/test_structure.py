"""The shape of the code, read from its import graph: one place for each mechanism, no
cycles, a core that names no workflow or backend, and host code that needs nothing
but the standard library, numpy and Pillow."""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("sheepdog", "web")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "guix" not in path.parts:
                found[_module_name(path)] = path
    return found


MODULES = _modules()


@functools.cache  # each file parsed once per run (the graph is asked for often)
def _imports(name: str, path: Path, top_level_only: bool = False) -> frozenset[str]:
    """Every module this one imports (anywhere in it, or only in its top-level code),
    absolute names."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out |= {f"{prefix}.{a.name}" for a in node.names}  # `from . import store`
    return frozenset(out)


@functools.cache
def _graph(registries: bool = True) -> dict[str, set[str]]:
    """Internal edges only: module -> the sheepdog/web modules it imports. The two
    registries import their members by name at run time (importlib): those edges are
    in the graph too, so a cycle made through a registry is seen."""
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {m for m in _imports(name, path) if m in MODULES and m != name}
    if not registries:
        return graph
    graph["sheepdog.workflows"] |= {m for m in MODULES if _is_workflow_module(m)}
    graph["sheepdog.backends.registry"] |= {m for m in MODULES if _is_backend(m)
                                            and m.count(".") == 2}
    return graph


def _is_workflow_module(name: str) -> bool:
    return name.startswith("sheepdog.workflows.") and name != "sheepdog.workflows.base"


def _is_workflow(name: str) -> bool:
    if name.startswith("sheepdog.gemma"):
        return True
    return name.startswith("sheepdog.workflows.") and name != "sheepdog.workflows.base"


def _is_backend(name: str) -> bool:
    return name.startswith("sheepdog.backends.") and name not in (
        "sheepdog.backends.base", "sheepdog.backends.registry")


def test_no_core_module_imports_a_workflow_or_a_backend():
    graph = _graph(registries=False)  # the registries find them by name
    core = [m for m in graph if not _is_workflow(m) and not _is_backend(m)]
    offenders = {m: sorted(d for d in graph[m] if _is_workflow(d) or _is_backend(d))
                 for m in core}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # a package's __init__ importing its own submodule is not a cycle of concepts
    real = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert not real, real


def test_only_dispatch_imports_the_queue_library():
    users = sorted(name for name, path in MODULES.items()
                   if any(m == "rq" or m.startswith("rq.") for m in _imports(name, path)))
    assert users == ["sheepdog.dispatch"]


def _closure(start: str) -> dict[str, bool]:
    """Modules that importing `start` may run: name -> whether all of it may (False: a
    parent package, of which only the top-level code runs)."""
    seen: dict[str, bool] = {}
    todo = [(start, True)]
    while todo:
        name, whole = todo.pop()
        if seen.get(name) is True or (name in seen and not whole):
            continue
        seen[name] = whole
        for imported in _imports(name, MODULES[name], top_level_only=not whole):
            if imported in MODULES:
                todo.append((imported, True))
        # a package's parents run too (sheepdog/__init__.py for sheepdog.gemma.ops), but
        # only their top-level code
        parent = name.rpartition(".")[0]
        if parent in MODULES:
            todo.append((parent, False))
    return seen


def test_code_run_on_hosts_needs_only_the_standard_library_numpy_and_pillow():
    allowed_third_party = {"numpy", "PIL"}
    steps = ["sheepdog.gemma.ops", "sheepdog.mapping.step", "sheepdog.calls",
             "sheepdog.cwlstep"]
    for step in steps:
        closure = _closure(step)
        outside = set()
        for name, whole in closure.items():
            for imported in _imports(name, MODULES[name], top_level_only=not whole):
                top = imported.split(".")[0]
                if top in PACKAGES or top in sys.stdlib_module_names or top == "__future__":
                    continue
                if top not in allowed_third_party:
                    outside.add(f"{name} imports {imported}")
        assert not outside, sorted(outside)
        assert "sheepdog.logs" not in closure and "sheepdog.store" not in closure


def test_backends_and_workflows_are_found_without_being_named():
    from sheepdog import workflows
    from sheepdog.backends import registry

    assert set(registry.names()) >= {"local", "shell", "slurm"}
    assert set(workflows.names()) >= {"command", "gemma-loco", "gemma-permute"}
    for name in registry.names():
        assert registry.backend_class(name).name == name
    for name in workflows.names():
        assert workflows.get(name).name == name


def test_host_steps_import_and_run_without_redis_py(tmp_path):
    """The same, at run time: with redis and rq made unimportable, the steps that run on
    hosts still import and run."""
    import json
    import subprocess

    script = (
        "import sys; sys.modules['redis'] = None; sys.modules['rq'] = None\n"
        "import sheepdog.gemma.ops, sheepdog.mapping.step, sheepdog.calls, sheepdog.cwlstep\n"
        "from sheepdog.mapping import step\n"
        "sys.exit(step.main(['run', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", script, json.dumps(
        {"items": [{"key": "a", "argv": [["echo"], ["hi"]]}]})], cwd=tmp_path,
        capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "results.jsonl").read_text())["output"] == "hi\n"


def test_the_web_service_loads_no_worker_loop():
    """Registration, maintenance and recording an outcome are modules of their own (as
    rq splits its worker): the web service and the pull worker protocol use them without
    importing the Redis worker's loop."""
    for start in ("web", "web.workers", "web.api", "sheepdog.pullwork", "sheepdog.pull"):
        assert "sheepdog.worker" not in _closure(start), start
    users = {name for name in MODULES if "sheepdog.registration" in _graph()[name]}
    assert {"sheepdog.worker", "sheepdog.pullwork"} <= users


def test_one_pool_starts_workers_and_one_rule_says_when_they_are_needed():
    """`serve`, a detached `run` and the Executor start `sheepdog worker` processes
    through pool.Pool only; "nobody serves this queue" is pool.unserved only."""
    spawners = sorted(name for name, path in MODULES.items()
                      if '"sheepdog", "worker"' in path.read_text())
    assert spawners == ["sheepdog.pool"]
    for name in ("sheepdog.cli", "sheepdog.runner", "sheepdog.executor", "sheepdog.clirun"):
        assert "sheepdog.pool" in _graph()[name], name
    asking = sorted(name for name, path in MODULES.items()
                    if "not live_workers(" in path.read_text())
    assert asking == ["sheepdog.pool"]


def test_workflows_and_backends_import_nothing_of_the_cli_or_the_web_service():
    """A workflow's command line gets the CLI's services, its routes the web service's,
    passed in (workflows.base.CliServices, WebServices): no arrow points up from a
    workflow or backend to the presentation."""
    graph = _graph()
    presentation = {m for m in graph if m in ("sheepdog.cli", "sheepdog.clirun")
                    or m == "web" or m.startswith("web.")}
    plugins = [m for m in graph if _is_workflow(m) or _is_backend(m)]
    assert plugins
    up = {m: sorted(graph[m] & presentation) for m in plugins}
    assert not {m: d for m, d in up.items() if d}


def test_the_architecture_map_names_every_module_and_only_real_ones():
    """docs/ARCHITECTURE.md is the map a new engineer reads first: every module of the
    core appears in it, and every `name.py` it names exists."""
    import re

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    core = {p.stem for p in (ROOT / "sheepdog").glob("*.py")} - {"__init__", "__main__"}
    missing = sorted(m for m in core if f"`{m}.py`" not in text and f"{m}.py" not in text)
    assert not missing, missing
    named = set(re.findall(r"`([a-z_/]+\.py)`", text))
    files = {str(p.relative_to(ROOT / "sheepdog")) for p in (ROOT / "sheepdog").rglob("*.py")}
    files |= {str(p.relative_to(ROOT)) for p in (ROOT / "web").rglob("*.py")}
    files |= {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")}
    leaves = {f.rsplit("/", 1)[-1] for f in files}
    unknown = sorted(n for n in named if n not in files and n.rsplit("/", 1)[-1] not in leaves)
    assert not unknown, unknown


def test_no_function_is_more_complex_than_15():
    """Cyclomatic complexity as radon counts it (boolean operators included, which
    ruff's mccabe check does not count): a function above 15 is split."""
    from radon.complexity import cc_visit

    too_complex = []
    for path in sorted([*(ROOT / "sheepdog").rglob("*.py"), *(ROOT / "web").rglob("*.py")]):
        for block in cc_visit(path.read_text()):
            if block.complexity > 15:
                too_complex.append(f"{path.relative_to(ROOT)}:{block.lineno} "
                                   f"{block.fullname} ({block.complexity})")
    assert not too_complex, too_complex


def test_processes_are_spawned_pumped_and_killed_in_one_module():
    """posix_spawn, the output pumps and the tree killers live in sheepdog.process, and
    GEMMA runs through it: no GEMMA code starts a process of its own."""
    machinery = ("posix_spawn(", "killpg(", "os.waitpid(", "/proc/{entry}", ".read1")
    elsewhere = {}
    for name, path in _modules().items():
        if name == "sheepdog.process":
            continue
        text = path.read_text()
        found = [m for m in machinery if m in text]
        if name.startswith("sheepdog.gemma") and "import subprocess" in text:
            found.append("import subprocess")
        if found:
            elsewhere[name] = found
    assert not elsewhere, elsewhere
