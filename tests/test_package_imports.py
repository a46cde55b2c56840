"""The package's own import graph: no cycles between modules (function-local imports included,
package __init__ files aside: they only gather names), and no private name (`_name`) imported
from another module of the package: what two modules share is a public name of the lower one."""

import ast
from pathlib import Path

import dpo_fast

ROOT = Path(dpo_fast.__file__).parent
# Compiled submodules (csrc/ built into dpo_fast/_C*.so): modules without a .py file.
EXTENSIONS = ("dpo_fast._C",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    return {**found, **{name: None for name in EXTENSIONS}}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, name: str, known: dict):
    """(imported module, names taken from it) for every import of the package's own modules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = {id(n) for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.If)
            and is_type_checking(node) for n in ast.walk(node)}
    for node in ast.walk(ast.parse(path.read_text())):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dpo_fast":
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dpo_fast":
                continue
            names = [a.name for a in node.names]
            # `from . import hf`: the submodule is what is imported.
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            yield from ((s, []) for s in subs)
            rest = [n for n in names if f"{target}.{n}" not in known]
            if rest or not subs:
                yield target, rest


def graph():
    known = modules()
    edges, private = {}, []
    for name, path in known.items():
        if path is None:
            continue
        deps = set()
        for target, names in imports(path, name, known):
            deps.add(target)
            private += [f"{name} imports {n} from {target}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
        edges[name] = {d for d in deps if d in known and d != name}
    return known, edges, private


def cycles(edges: dict, packages: set) -> list[list[str]]:
    """Each cycle among the modules (packages' __init__ left out), found by a depth-first walk."""
    nodes = {n: {d for d in deps if d not in packages} for n, deps in edges.items() if n not in packages}
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(nodes.get(n, ())):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(nodes):
        if n not in state:
            visit(n)
    return found


def test_the_checker_finds_what_it_looks_for(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, set()) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"p"}, "p": {"a"}}, {"p"}) == []
    known, edges, _ = graph()
    assert "dpo_fast.loss_settings" in edges["dpo_fast.loss"]  # relative imports are resolved
    assert "dpo_fast.hf" in edges["dpo_fast.trainer.policy"]  # `from .. import hf`


def test_no_import_cycles():
    known, edges, _ = graph()
    packages = {module_name(p) for p in known.values() if p is not None and p.name == "__init__.py"}
    assert cycles(edges, packages) == []


def test_no_private_names_imported_across_modules():
    assert graph()[2] == []


# The layers of ARCHITECTURE.md, lowest first: a module imports from its own layer or lower ones.
LAYERS = (
    ("backends", "_C", "targets", "options", "progress", "distributed"),
    ("loss_settings", "objectives", "kernels"),
    ("ops",),
    ("tensor_parallel", "functional"),
    ("data",),
    ("loss", "ranking", "hf", "heads", "gguf_loading", "tied_gradient", "prefix_sharing"),
    ("refcache",),
    ("trainer", "integrations"),
    ("cli", "__main__"),
)


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package's __init__: it gathers the public names of every layer
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), -1)


def test_every_module_has_a_layer_and_imports_only_downwards():
    known, edges, _ = graph()
    unplaced = sorted({m.split(".")[1] for m in known if layer_of(m) == -1})
    assert unplaced == [], "place these in LAYERS (and ARCHITECTURE.md)"
    upward = [f"{m} ({LAYERS[layer_of(m)][0]} layer) imports {d}" for m, deps in edges.items() for d in deps
              if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)]
    assert upward == []


def test_the_library_never_imports_its_tools():
    """dpo_fast_tools (bench, reproduce, demo, tiny models) sits on top of the library: `dpo-fast bench`
    and friends name their modules as strings, loaded only when the subcommand runs."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.relative_to(ROOT.parent)} imports {n}" for n in names
                          if n.split(".")[0] == "dpo_fast_tools"]
    assert offenders == []
