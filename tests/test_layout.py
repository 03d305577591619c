"""The shape of innernet.py, checked so it cannot rot (style.md §10.1).

The module reads top to bottom in banner sections, each using only the
sections above it; no function is longer than a screen, except the argument
parser, which is a list of options.
"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "innernet.py")
BANNER = re.compile(r"^# (\S.*?) #{4,}$")
SECTIONS = ["Imports and optional dependencies", "Constants", "Fast path of an unchanged fetch",
            "Errors and output", "Utilities", "Keys", "Model", "Network backends", "Store",
            "API server", "API client", "Client sync", "Roles", "Command line"]
PARSER = {"build_parser", "_add_shared_verbs"}      # option lists, long by nature
MAX_LINES = 60


def _module():
    with open(SOURCE, encoding="utf-8") as f:
        text = f.read()
    banners = [(i + 1, m.group(1)) for i, line in enumerate(text.splitlines())
               if (m := BANNER.match(line))]
    return text, ast.parse(text), banners


def _section_of(banners, lineno):
    index = -1                         # before the first banner: the docstring, __version__
    for i, (line, _) in enumerate(banners):
        if line <= lineno:
            index = i
    return index


def _bound(node):
    """Names a top-level statement binds inside itself (locals, arguments)."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and n is not node:
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
    return names


def _top_names(stmt):
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def test_sections_are_the_documented_ones_in_order():
    text, _, banners = _module()
    assert [name for _, name in banners] == SECTIONS
    doc = ast.get_docstring(ast.parse(text))
    for i, name in enumerate(SECTIONS, 1):      # the docstring's map matches
        assert re.search(rf"\b{i} {re.escape(name)}\b", doc), name


def test_no_section_uses_a_later_one():
    _, tree, banners = _module()
    home = {}
    for stmt in tree.body:
        for name in _top_names(stmt):
            home.setdefault(name, _section_of(banners, stmt.lineno))
    wrong = []
    for stmt in tree.body:
        if isinstance(stmt, ast.If):       # if __name__ == "__main__": at the end
            continue
        here = _section_of(banners, stmt.lineno)
        local = _bound(stmt) - set(_top_names(stmt))
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) \
                    and n.id not in local and home.get(n.id, -1) > here:
                wrong.append(f"line {n.lineno}: {banners[here][1]} uses {n.id} "
                             f"from {banners[home[n.id]][1]}")
    assert not wrong, "\n".join(wrong)


def test_no_function_is_longer_than_a_screen():
    _, tree, _ = _module()
    long = []

    def walk(node, prefix=""):
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not isinstance(n, ast.ClassDef):
                    start = min([n.lineno] + [d.lineno for d in n.decorator_list])
                    size = n.end_lineno - start + 1
                    if size > MAX_LINES and n.name not in PARSER:
                        long.append(f"{prefix}{n.name} (line {n.lineno}): {size} lines")
                walk(n, prefix + n.name + ".")
    walk(tree)
    assert not long, "\n".join(long)


def test_coordinator_is_small():
    _, tree, _ = _module()
    (co,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Coordinator"]
    assert co.end_lineno - co.lineno + 1 < 120


def test_model_does_no_io():
    """Model is pure: no sockets, files, subprocesses, clocks or name
    resolution in it (callers pass the time and a resolver in)."""
    _, tree, banners = _module()
    model = SECTIONS.index("Model")
    effects = {"socket", "os", "subprocess", "fcntl", "sqlite3", "urllib", "time", "open",
               "resolve_endpoint", "run", "atomic_write", "threading"}
    clock = {"time", "monotonic", "sleep"}          # time.strftime and gmtime are pure
    used = [f"line {n.lineno}: {ast.unparse(n)}" for stmt in tree.body
            if _section_of(banners, stmt.lineno) == model for n in ast.walk(stmt)
            if isinstance(n, ast.Name) and n.id in effects - {"time"}
            or isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "time" and n.attr in clock]
    assert not used, "\n".join(used)
