"""The package layout as an import graph: layers flow one way (engine -> ckernels, formats;
ckernels and formats import nothing of ours), inside engine the library never imports its
programs (engine.cli) or the converter (engine.convert), and there are no import cycles,
counting imports inside functions too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("formats", "ckernels", "engine")
ABOVE_THE_LIBRARY = ("engine.cli", "engine.convert", "engine.__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict:
    """{module name: path} for every .py file of our packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imports_of(name: str, path: Path, known: dict) -> set:
    """Our modules that `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a package path
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_layers_flow_one_way():
    for name, deps in graph().items():
        top = name.split(".")[0]
        for d in deps:
            if top in ("formats", "ckernels"):
                assert d.split(".")[0] == top, f"{name} imports {d}: {top} imports nothing of ours"
            is_library = not name.startswith(ABOVE_THE_LIBRARY)
            if is_library:
                assert not d.startswith(ABOVE_THE_LIBRARY), \
                    f"library module {name} imports {d}, which sits above the library"
            if name.startswith("engine.convert"):
                assert not d.startswith("engine.cli"), f"the converter {name} imports the program {d}"


def test_no_import_cycles():
    g = graph()
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_programs_parse_arguments_not_the_library():
    """Argument parsing lives in engine.cli; the library and the converter take arguments."""
    for name, path in modules().items():
        if name.startswith("engine") and not name.startswith("engine.cli"):
            tree = ast.parse(path.read_text())
            names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                     for a in n.names} | {n.module for n in ast.walk(tree)
                                          if isinstance(n, ast.ImportFrom)}
            assert "argparse" not in names, f"{name} imports argparse; programs live in engine.cli"
