"""The package's layers (docs/design.md §8), read from the source: no module imports the
command line, and no imports go round in a circle, between modules or between packages."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embcam"


def _modules() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's embcam imports at run time (lazy ones too; ``if TYPE_CHECKING`` ones not)."""
    def known(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
        found = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                names = [source] + [f"{source}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found |= {known(n) for n in names if n.split(".")[0] == "embcam"}
        graph[module] = found - {module, "embcam"}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def _package(module: str) -> str:
    """A subpackage's modules are one node; a top-level module is its own."""
    return ".".join(module.split(".")[:2])


def test_the_graph_reader_sees_lazy_and_relative_imports():
    graph = _imports(_modules())
    assert "embcam.job.pipeline" in graph["embcam.cli"]  # imported inside a function
    assert {"embcam.data.runstate", "embcam.job.user_code", "embcam.faults"} <= graph["embcam.job.pipeline"]
    assert "embcam.job.pipeline" not in graph["embcam.job.user_code"]  # only under TYPE_CHECKING


def test_no_module_imports_the_command_line():
    graph = _imports(_modules())
    assert [m for m, imported in graph.items() if "embcam.cli" in imported] == []


def test_no_import_circles_between_modules():
    assert _circles(_imports(_modules())) == []


def test_no_import_circles_between_packages():
    packages: dict[str, set[str]] = {}
    for module, imported in _imports(_modules()).items():
        packages.setdefault(_package(module), set()).update(_package(m) for m in imported)
    for package, imported in packages.items():
        imported.discard(package)
    assert _circles(packages) == []
