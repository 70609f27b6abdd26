"""The layers of the code, as the README's "Layout of the code" draws them: imports point one
way, only the FUSE adapter and the mount entry point import pyfuse3/trio, the engine never
imports the tools, and no module or class grows back into one room. Read from the source
(every import statement counts, those inside functions too), not from what happens to be
imported at run time."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_CLASS, MAX_MODULE = 600, 900

# The engine, lowest first: a module may import only modules before it in this list.
ENGINE = [
    "kvfs.errors", "kvfs.units", "kvfs.codec", "kvfs.meta", "kvfs.store", "kvfs.layout",
    "kvfs.core", "kvfs.blocks", "kvfs.namespace", "kvfs.blockcache", "kvfs.policy",
    "kvfs.files", "kvfs.reads", "kvfs.shared_files", "kvfs.shared", "kvfs.direct", "kvfs.mkfs", "kvfs.warehouse", "kvfs.direct_server",
]
FUSE_ONLY = {"kvfs.fs", "kvfs.mount"}  # the only importers of pyfuse3 and trio


def _modules() -> dict[str, str]:
    """Module name -> path, for kvfs/ and tools/ (installed as kvfs.tools)."""
    out = {}
    for top, package in (("kvfs", "kvfs"), ("tools", "kvfs.tools")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, top))
                    parts = [package] + rel[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts.pop()
                    out[".".join(parts)] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def _graph():
    mods = _modules()
    imports = {name: _imports(name, path) for name, path in mods.items()}
    graph = {name: {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
             for name, deps in imports.items()}
    return mods, imports, graph


def test_tools_live_in_their_top_level_directory():
    mods, _, _ = _graph()
    assert os.path.isdir(os.path.join(ROOT, "tools"))
    assert "kvfs.tools.main" in mods and not os.path.exists(os.path.join(ROOT, "kvfs", "cli.py"))


def test_no_import_cycle():
    _, _, graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(v, path):
        state[v] = 1
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    assert cycles == []


def test_engine_imports_point_down():
    _, _, graph = _graph()
    for i, name in enumerate(ENGINE):
        above = set(graph[name]) - set(ENGINE[:i])
        assert not above, f"{name} imports {sorted(above)}, which are not below it"


def test_only_the_fuse_layer_imports_pyfuse3_and_trio_and_the_engine_never_the_tools():
    _, imports, _ = _graph()
    for name, deps in imports.items():
        if name not in FUSE_ONLY:
            assert not {d.split(".")[0] for d in deps} & {"pyfuse3", "trio"}, name
        if not name.startswith("kvfs.tools"):
            assert not any(d == "kvfs.tools" or d.startswith("kvfs.tools.") for d in deps), name


def test_the_tools_load_neither_pyfuse3_nor_trio():
    """Offline tools work without FUSE: building the whole parser and the client imports
    neither (what a module imports inside its functions is only loaded when run)."""
    res = subprocess.run([sys.executable, "-c", "import sys, kvfs.tools.main as m, kvfs.tools.client, kvfs.mounttab; "
                          "m.build_parser(); print(sorted({'pyfuse3', 'trio'} & set(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_every_module_says_what_it_owns_and_none_is_one_room():
    mods, _, _ = _graph()
    for name, path in mods.items():
        src = open(path).read()
        tree = ast.parse(src, path)
        assert ast.get_docstring(tree), f"{name} has no module docstring"
        assert src.count("\n") + 1 <= MAX_MODULE, f"{name} has over {MAX_MODULE} lines"
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= MAX_CLASS, f"{name}.{node.name} over {MAX_CLASS} lines"
