"""Import structure, read from the source with ``ast`` (nothing is imported).

- common/ is layered: its import graph (module-level and function-level imports alike) has no
  cycle, so each module can be read after the ones it imports, never in a loop.
- No module of common/ reads another project module's private (underscore) names: what one
  module offers another is public, so a private name can change without a search.
- Test files share code through helper modules (tests/oracles.py, tests/cast_paths.py), never
  by importing one another: a test file is collected as a test, not used as a library.
- The shared references (tests/oracles.py) stay independent of the casts they check: from
  common/ they take the spec parser only.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module(path: Path) -> str:
    """Dotted module name of a file under ROOT (a package's __init__ is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict:
    """Every module of `package` (dotted name -> path)."""
    return {_module(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _imported(node: ast.AST, name: str, is_package: bool, known) -> list:
    """What an Import/ImportFrom node in module `name` reads, as (module, attr, local) triples:
    the dotted module, the attribute taken from it (None: the module itself), and the local
    name bound to the module (None where the import binds an attribute of it)."""
    if isinstance(node, ast.Import):
        triples = []
        for a in node.names:
            top = a.name.split(".")[0]
            if a.asname or top == a.name:          # `import m as X`, `import m`: binds X, m
                triples.append((a.name, None, a.asname or a.name))
            else:                                  # `import p.m` binds p, and imports p.m
                triples += [(a.name, None, None), (top, None, top)]
        return triples
    base = name if is_package else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    source = ".".join(filter(None, [base if node.level else "", node.module or ""]))
    triples = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        local = alias.asname or alias.name
        triples.append((sub, None, local) if sub in known else (source, alias.name, None))
    return triples


def _scan(modules: dict, known) -> tuple:
    """(edges, private_reads): the project modules each module imports, and every place one
    reads another project module's private name (`from m import _x` or `m._x`)."""
    edges, private = {}, []
    for name, path in modules.items():
        where = path.relative_to(ROOT)
        tree = ast.parse(path.read_text(), str(path))
        edges[name] = set()
        bound = {}                                 # local name -> the module it stands for
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for module, attr, local in _imported(node, name, path.name == "__init__.py", known):
                if module not in known:
                    continue
                if module != name:
                    edges[name].add(module)
                if local is not None:
                    bound[local] = module
                elif attr is not None and _private(attr) and module != name:
                    private.append(f"{where}:{node.lineno} from {module} import {attr}")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                module = ".".join([bound[value.id]] + chain)
                if module in known and module != name:
                    private.append(f"{where}:{node.lineno} {module}.{node.attr}")
    return edges, private


def _private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def _cycle(edges: dict):
    """One import cycle as a list of modules, or None."""
    state = {}                                     # module -> "open" (on the path) or "done"

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_common_has_no_import_cycle():
    common = _modules("common")
    edges, _ = _scan(common, common)
    assert "common.quant" in edges and edges["common.quant"], "the scan found no imports"
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_common_reads_no_private_names_of_other_modules():
    common = _modules("common")
    _, private = _scan(common, common)
    assert not private, "private names read across modules:\n" + "\n".join(private)


def _imports_of(path: Path, name: str, known) -> set:
    """(line, module) of every import in the file, function-level ones included."""
    return {(node.lineno, module)
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for module, _, _ in _imported(node, name, False, known)}


def test_test_files_do_not_import_each_other():
    tests = _modules("tests")
    known = set(tests)        # `from tests import test_x`; `from test_x import y` is caught too
    bad = sorted(f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for name, path in tests.items()
                 for line, module in _imports_of(path, name, known)
                 if module.rpartition(".")[2].startswith("test_"))
    assert not bad, "test code importing test files:\n" + "\n".join(bad)


def test_oracles_take_only_the_spec_parser_from_common():
    path = ROOT / "tests" / "oracles.py"
    common = {m for _, m in _imports_of(path, "oracles", set(_modules("common")))
              if m.split(".")[0] == "common"}
    assert common == {"common.formats"}, common


def test_the_checks_see_what_they_look_for():
    """The scanner itself on made-up input: a cycle and its absence, and how imports resolve."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    known = {"pkg", "pkg.a", "pkg.b"}
    tree = ast.parse("from . import b as B\nfrom .b import _x, y\nimport pkg.b\n")
    found = [t for node in tree.body for t in _imported(node, "pkg.a", False, known)]
    assert found == [("pkg.b", None, "B"), ("pkg.b", "_x", None), ("pkg.b", "y", None),
                     ("pkg.b", None, None), ("pkg", None, "pkg")]


def test_library_modules_do_not_import_the_command_line():
    """Only entry points and the flag helpers import common.cli: the loop, the run records, the
    evaluation and the report load without it (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, common.train, common.checkpoint, common.runs, common.data, common.ptq, "
            "common.evaluation, common.report, common.config; "
            "print(sorted(m for m in ('common.cli', 'common.qat_cli', 'common.sweep') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip()
    assert out == "[]", out
