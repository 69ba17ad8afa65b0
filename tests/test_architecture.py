"""The package's shape, read from its source with ``ast`` (nothing of lorakit is imported).

- no import cycle among lorakit's modules, counting imports inside functions and under
  ``TYPE_CHECKING``: a circle is a design smell wherever the import sits;
- no function body over 60 lines (its docstring not counted), no module over 500 lines;
- at most 15 modules at the top of ``src/lorakit``: the folders carry the architecture;
- ``vlm/`` (its demo aside) at most 700 lines: only what differs for images lives there;
- at most 3 checks for a layer class (``isinstance``, ``type(x) is``) outside ``layers/``,
  each with a comment saying why: everything else asks the layers what they do.

Each check names what breaks it (file:line, name, size). The checks are tested on small
packages written to ``tmp_path`` first, so a checker that finds nothing is caught too.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500
MAX_TOP_LEVEL_MODULES = 15
MAX_VLM_LINES = 700
MAX_LAYER_CLASS_CHECKS = 3

Edge = tuple[str, str, int]  # (imported module, importing file, line)


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every module under ``root`` (a package's ``__init__``: the
    package's own name)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _import_targets(node: ast.AST, name: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The modules of ours that an ``import`` or ``from ... import`` statement loads."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if alias.name in known)
        return
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative: from the importing module's package, up level - 1 more
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    for alias in node.names:
        # ``from PKG import name``: the submodule when there is one, else PKG's __init__.
        submodule = f"{target}.{alias.name}"
        if submodule in known:
            yield submodule
        elif target in known:
            yield target


def import_graph(root: Path) -> dict[str, list[Edge]]:
    """Module -> the modules of ours it imports, anywhere in its file."""
    modules = module_names(root)
    known = set(modules)
    graph: dict[str, list[Edge]] = {name: [] for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _import_targets(node, name, is_package, known):
                    if target != name:  # a package naming its own names is no cycle
                        graph[name].append((target, str(path), node.lineno))
    return graph


def _strong_components(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            target = next((t for t, _, _ in edges if t not in index or t in on_stack), None)
            if target is None:  # every edge followed: close the node
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while not component or component[-1] != node:
                        component.append(stack.pop())
                        on_stack.discard(component[-1])
                    components.append(sorted(component))
            elif target in index:
                low[node] = min(low[node], index[target])
            else:
                index[target] = low[target] = len(index)
                stack.append(target)
                on_stack.add(target)
                work.append((target, iter(graph[target])))
    return components


def _shortest_cycle(graph: dict[str, list[Edge]], component: list[str]) -> list[Edge]:
    """The shortest import path from the component's first module back to it (breadth first)."""
    members, start = set(component), component[0]
    reached: dict[str, tuple[str, Edge]] = {}  # module -> (its importer, the import)
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for edge in graph[node]:
            if edge[0] == start:
                path = [edge]
                while node != start:
                    node, step = reached[node]
                    path.append(step)
                return path[::-1]
            if edge[0] in members and edge[0] not in reached:
                reached[edge[0]] = (node, edge)
                queue.append(edge[0])
    raise AssertionError(f"no cycle through {start}")


def import_cycles(root: Path) -> list[str]:
    """One line per import cycle: ``a -> b (file:line) -> ... -> a``."""
    graph = import_graph(root)
    cycles = []
    for component in _strong_components(graph):
        if len(component) > 1:
            steps = " -> ".join(
                f"{target} ({Path(file).relative_to(root.parent)}:{line})"
                for target, file, line in _shortest_cycle(graph, component)
            )
            cycles.append(f"{component[0]} -> {steps}; the circle holds {', '.join(component)}")
    return cycles


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions whose body, without the docstring, runs over ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if ast.get_docstring(node, clean=False) is not None:
                body = body[1:]
            if body and (size := body[-1].end_lineno - body[0].lineno + 1) > limit:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} {size}")
    return found


def long_modules(root: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    """Modules over ``limit`` lines."""
    sizes = {p: len(p.read_text().splitlines()) for p in sorted(root.rglob("*.py"))}
    return [f"{p.relative_to(root.parent)} {n}" for p, n in sizes.items() if n > limit]


def _layer_classes(layers: Path) -> set[str]:
    """The names of the classes ``layers/`` defines (its contract ``LoraLayer`` and ``Wrapper``
    included: outside ``layers/``, code asks the layers what they do, not what they are)."""
    return {
        node.name
        for path in sorted(layers.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ClassDef)
    }


def _names(node: ast.AST) -> set[str]:
    """Class names an expression refers to: ``A``, ``mod.A``, ``(A, mod.B)``."""
    if isinstance(node, ast.Tuple):
        return {name for element in node.elts for name in _names(element)}
    if isinstance(node, ast.Name):
        return {node.id}
    return {node.attr} if isinstance(node, ast.Attribute) else set()


def _class_checks(tree: ast.AST, classes: set[str]) -> Iterator[tuple[int, str]]:
    """``isinstance(x, C)``, ``issubclass(x, C)`` and every comparison naming ``C``
    (``type(x) is C``, ``layer_class_for(m) is not C``, ``==``, ``in``) on ``classes``."""
    aliases = {
        alias.asname: alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname
    }
    for node in ast.walk(tree):
        operands: list[ast.AST] = []
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("isinstance", "issubclass"):
            operands = node.args[1:2]
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        named = {aliases.get(n, n) for o in operands for n in _names(o)} & classes
        if named:
            yield node.lineno, ", ".join(sorted(named))


def layer_class_checks(root: Path) -> tuple[list[str], list[str]]:
    """Checks for a layer class outside ``layers/``: all of them, and those without
    a comment on their line or the line above."""
    classes = _layer_classes(root / "layers")
    checks, uncommented = [], []
    for path in sorted(root.rglob("*.py")):
        if (root / "layers") in path.parents:
            continue
        text = path.read_text()
        tokens = tokenize.generate_tokens(io.StringIO(text).readline)
        commented = {t.start[0] for t in tokens if t.type == tokenize.COMMENT}
        for line, named in sorted(_class_checks(ast.parse(text, str(path)), classes)):
            where = f"{path.relative_to(root.parent)}:{line} {named}"
            checks.append(where)
            if not {line, line - 1} & commented:
                uncommented.append(where)
    return checks, uncommented


# --- the checks, on lorakit -------------------------------------------------------------------


def test_no_import_cycle():
    cycles = import_cycles(SRC)
    print("\n".join(cycles))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_over_60_lines():
    found = long_functions(SRC)
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


def test_no_module_over_500_lines():
    found = long_modules(SRC)
    assert not found, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(found)


def test_at_most_15_top_level_modules():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(top)} modules at the top of src/lorakit (at most {MAX_TOP_LEVEL_MODULES}): "
        + ", ".join(top)
    )


def test_vlm_without_its_demo_is_at_most_700_lines():
    sizes = {
        str(p.relative_to(SRC.parent)): len(p.read_text().splitlines())
        for p in sorted((SRC / "vlm").rglob("*.py"))
        if p.relative_to(SRC / "vlm") != Path("demo.py")
    }
    total = sum(sizes.values())
    assert total <= MAX_VLM_LINES, (
        f"vlm/ without demo.py has {total} lines (at most {MAX_VLM_LINES}): "
        + ", ".join(f"{p} {n}" for p, n in sizes.items())
    )


def test_at_most_3_layer_class_checks_outside_layers_each_commented():
    checks, uncommented = layer_class_checks(SRC)
    assert len(checks) <= MAX_LAYER_CLASS_CHECKS and not uncommented, (
        f"{len(checks)} checks for a layer class outside layers/ (at most "
        f"{MAX_LAYER_CLASS_CHECKS}), {len(uncommented)} without a comment saying why:\n"
        + "\n".join(f"{c}{'  (no comment)' if c in uncommented else ''}" for c in checks)
    )


# --- the checkers, on packages written here -----------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` under ``root`` with ``files`` (relative path -> source)."""
    for relative, source in {"__init__.py": "", **files}.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / "pkg"


@pytest.mark.parametrize(
    "files",
    [
        # inside a function, and relative from a subpackage
        {
            "a.py": "def f():\n    from .sub import b\n",
            "sub/__init__.py": "",
            "sub/b.py": "from .. import a\n",
        },
        # under TYPE_CHECKING, absolute
        {"a.py": "if TYPE_CHECKING:\n    import pkg.b\n", "b.py": "from pkg.a import x\n"},
        # a package's __init__ importing its submodule, which imports a name from the package
        {"sub/__init__.py": "from .m import f\n", "sub/m.py": "from . import helper\n"},
    ],
)
def test_cycles_are_found_wherever_the_import_sits(tmp_path, files):
    (cycle,) = import_cycles(_package(tmp_path, files))
    assert cycle.startswith("pkg.") and " -> " in cycle and ".py:" in cycle


def test_imports_one_way_are_no_cycle(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "from .a import f\nfrom . import b\n",
            "a.py": "from .b import g\nfrom . import b\n",
            "b.py": "import os\nfrom .. import elsewhere\n",
            "sub/__init__.py": "from .m import h\n",
            "sub/m.py": "from ..a import f\nfrom .m import h\n",  # itself: no cycle
        },
    )
    assert import_cycles(root) == []
    graph = import_graph(root)
    assert {t for t, _, _ in graph["pkg.a"]} == {"pkg.b"}
    assert {t for t, _, _ in graph["pkg.sub.m"]} == {"pkg.a"}


def test_a_cycle_names_each_step_with_its_file_and_line(tmp_path):
    root = _package(
        tmp_path,
        {
            "a.py": "import os\nfrom .b import x\n",
            "b.py": "from .c import y\n",
            "c.py": "\n\nfrom . import a\n",
        },
    )
    assert import_cycles(root) == [
        "pkg.a -> pkg.b (pkg/a.py:2) -> pkg.c (pkg/b.py:1) -> pkg.a (pkg/c.py:3); "
        "the circle holds pkg.a, pkg.b, pkg.c"
    ]


def test_function_length_leaves_out_the_docstring(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    root = _package(
        tmp_path,
        {
            "m.py": f'def ok():\n    """Doc\n\n    more."""\n{body}\n\n\n'
            f"def long():\n    y = 0\n{body}\n"
        },
    )
    assert long_functions(root) == ["pkg/m.py:67 long 61"]
    assert long_modules(root, limit=100) == ["pkg/m.py 128"]


def test_layer_class_checks_are_found_with_their_comments(tmp_path):
    root = _package(
        tmp_path,
        {
            "layers/__init__.py": "",
            "layers/base.py": (
                "class Wrapper(nn.Module): pass\n"
                "class LoraLayer(Wrapper):\n    def f(self):\n        raise NotImplementedError\n"
                "class LoraLinear(LoraLayer): pass\n"
                "class Tokens(Wrapper): pass\n"
                "class Function(torch.autograd.Function): pass\n"
            ),
            "layers/use.py": "isinstance(m, LoraLinear)\n",  # inside layers/: not counted
            "io.py": (
                "from .layers.base import Tokens as T\n"
                "isinstance(m, (int, LoraLayer))  # why\n"
                "# why\n"
                "isinstance(m, layers.LoraLinear)\n"
                "if type(m) is T: pass  # why\n"
                "\n"
                "ok = type(m) in (int, LoraLinear)\n"
                "isinstance(err, LoraError)\n"  # not a layer class
                "if entry.layer is not LoraLinear: pass\n"
                "layer_class_for(m) is LoraLinear  # why\n"
                "issubclass(kind, LoraLayer)\n"  # the line above comments it
            ),
        },
    )
    assert layer_class_checks(root) == (
        [
            "pkg/io.py:2 LoraLayer",
            "pkg/io.py:4 LoraLinear",
            "pkg/io.py:5 Tokens",
            "pkg/io.py:7 LoraLinear",
            "pkg/io.py:9 LoraLinear",
            "pkg/io.py:10 LoraLinear",
            "pkg/io.py:11 LoraLayer",
        ],
        ["pkg/io.py:7 LoraLinear", "pkg/io.py:9 LoraLinear"],
    )
