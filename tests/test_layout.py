"""The shape of innernet.py, checked so it cannot rot (style.md §10.1).

The module reads top to bottom in banner sections, each on one subject (a
noun or a journey) and using only the sections above it; no section is
longer than a long file's chapter, no function longer than a screen, except
the argument parser, which is a list of options.
"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "innernet.py")
BANNER = re.compile(r"^# (\S.*?) #{4,}$")
# Each section with its tier: "base" is the vocabulary more than one role
# uses (checked below); "server", "client", "admin" belong to one role;
# "front" is the command line every verb comes in through.
TIERS = {
    "Imports and optional dependencies": "base",
    "Constants": "base",
    "Fast path of an unchanged fetch": "client",
    "Errors and output": "base",
    "Files and formats": "base",
    "Names and addresses": "base",
    "Keys and WireGuard messages": "base",
    "Records": "base",
    "Access rules": "base",
    "Network lock": "base",
    "Lock verification": "base",
    "Device plans": "base",
    "Links, routes and rules": "base",
    "WireGuard devices": "base",
    "Network as code": "base",
    "Lock signing and storage": "base",
    "Database schema": "base",
    "Store": "base",
    "HTTP wire": "base",
    "API client": "base",
    "Interface files": "base",
    "Prompts": "base",
    "Relays": "server",
    "DNS and metrics": "server",
    "Server state": "server",
    "Replication": "server",
    "API routes": "server",
    "HTTP server": "server",
    "Paths": "client",
    "Fetch": "client",
    "Daemon": "client",
    "Admin verbs": "admin",
    "Lock verbs": "admin",
    "Server verbs": "server",
    "Client verbs": "client",
    "Command line": "front",
}
SECTIONS = list(TIERS)
PURE = ["Records", "Access rules", "Device plans", "Network as code"]
MAX_SECTION_LINES = 950            # about 900: a chapter, read in one sitting
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


def test_sections_are_chapters_not_books():
    text, _, banners = _module()
    ends = [line for line, _ in banners[1:]] + [len(text.splitlines()) + 1]
    big = [f"{name}: {end - line} lines" for (line, name), end in zip(banners, ends)
           if end - line > MAX_SECTION_LINES]
    assert not big, "\n".join(big)


def test_pure_sections_do_no_io():
    """Records, access rules, device plans and the network as code are pure:
    no sockets, files, subprocesses, clocks or name resolution in them
    (callers pass the time and a resolver in)."""
    _, tree, banners = _module()
    pure = {SECTIONS.index(name) for name in PURE}
    effects = {"socket", "os", "subprocess", "fcntl", "sqlite3", "urllib", "time", "open",
               "resolve_endpoint", "run", "atomic_write", "threading"}
    clock = {"time", "monotonic", "sleep"}          # time.strftime and gmtime are pure
    used = [f"line {n.lineno}: {ast.unparse(n)}" for stmt in tree.body
            if _section_of(banners, stmt.lineno) in pure for n in ast.walk(stmt)
            if isinstance(n, ast.Name) and n.id in effects - {"time"}
            or isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "time" and n.attr in clock]
    assert not used, "\n".join(used)


VERBS = [s for s in SECTIONS if s.endswith(" verbs")] + ["Command line"]


def test_no_function_below_the_verbs_takes_the_command_line():
    """argparse's Namespace stops at the verbs: each builds what it needs from
    it once (FetchOptions, Dirs and ClientFiles, HostsOptions: their
    from_args) and hands that down. Below the verb sections, only a cmd_<verb>
    (cmd_fetch lives with the fetch) and a from_args take ``args``; nothing
    makes a Namespace of its own."""
    _, tree, banners = _module()
    first_verb = min(SECTIONS.index(s) for s in VERBS)
    wrong = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                and _section_of(banners, node.lineno) < first_verb \
                and not node.name.startswith("cmd_") and node.name != "from_args":
            params = [a.arg for a in node.args.posonlyargs + node.args.args
                      + node.args.kwonlyargs]
            if {"args", "namespace", "ns"} & set(params):
                wrong.append(f"line {node.lineno}: {node.name}({', '.join(params)})")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "argparse" and node.attr == "Namespace" \
                and _section_of(banners, node.lineno) < first_verb:
            wrong.append(f"line {node.lineno}: argparse.{node.attr}")
    assert not wrong, "\n".join(wrong)


def _records(tree, banners):
    records = SECTIONS.index("Records")
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)
            and _section_of(banners, n.lineno) == records
            and any("record" in ast.unparse(d) for d in n.decorator_list)}


def test_records_are_frozen_and_built_by_keyword():
    """The Records section's records cannot change once made, and every
    construction of one in the module names its fields (cls(...) in their
    own constructors too): a field added or moved cannot shift the others."""
    _, tree, banners = _module()
    records = _records(tree, banners)
    assert {"Peer", "Cidr", "Association", "InterfaceConfig"} <= set(records)
    thawed = [name for name, node in records.items()
              if not any("frozen=True" in ast.unparse(d) for d in node.decorator_list)]
    assert not thawed, thawed
    positional = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in records:
            positional += [f"line {n.lineno}: {node.name}: {ast.unparse(n)[:70]}"
                           for n in ast.walk(node) if isinstance(n, ast.Call)
                           and isinstance(n.func, ast.Name) and n.func.id == "cls" and n.args]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in records and node.args:
            positional.append(f"line {node.lineno}: {ast.unparse(node)[:70]}")
    assert not positional, "\n".join(positional)


def test_one_function_per_name_and_no_local_hides_one():
    """A name means one thing: no method shares a module-level function's
    name (but run, a thread's by convention), and no local (argument, variable)
    hides a module-level function or class. The fast path is left out: it
    also runs alone (the zipapp's innernet_fast), where those are not seen."""
    _, tree, banners = _module()
    fast = SECTIONS.index("Fast path of an unchanged fetch")
    module = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    methods = [f"line {m.lineno}: {c.name}.{m.name}" for c in tree.body
               if isinstance(c, ast.ClassDef) for m in c.body
               if isinstance(m, ast.FunctionDef) and m.name in module - {"run"}]
    assert not methods, "\n".join(methods)
    hidden = []
    for top in tree.body:
        if _section_of(banners, top.lineno) == fast:
            continue
        for fn in ast.walk(top):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            a = fn.args
            names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
            for n in ast.walk(fn) if not isinstance(fn, ast.Lambda) else ():
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    names.add(n.id)
            hidden += [f"line {fn.lineno}: {getattr(fn, 'name', 'lambda')}: {x}"
                       for x in sorted(names & module)]
    assert not hidden, "\n".join(sorted(set(hidden)))


# -- journeys -------------------------------------------------------------------
# How many sections does one journey make a reader cross? The measure: a static
# walk of module-level names from the journey's entry points. A function, class
# or assignment reached adds every module-level name it loads (a class: all its
# methods); names bound locally are not followed. Calls through attributes
# (self.store.add_peer(...), a handler found in the route table) are not
# followed, so each side of an HTTP call or table dispatch is its own entry
# point. A journey's sections are those of the names reached, plus Command line
# when it starts on the command line (main() reaches every verb through the
# parser, so it is counted, not walked), less the "base" sections: the
# vocabulary of records, keys, files, devices, store and HTTP that two or more
# roles use (test_base_sections_are_shared proves they are shared, so a role's
# own code cannot hide there).
JOURNEYS = {
    # cron runs the launcher: the fast path answers an unchanged fetch, else
    # main() runs cmd_fetch (ask, settle paths, apply).
    "cron fetch": (["launch", "cmd_fetch"], True),
    # the admin's verb, and the server's handler the API call reaches.
    "admin add-peer": (["launch", "cmd_add_peer", "admin_add_peer"], True),
    # a client asks for a relay, the server grants it, the hub forwards.
    "relayed packet": (["request_relays", "user_relay", "RelayHub"], False),
}
MAX_JOURNEY_SECTIONS = 4


def _graph():
    _, tree, banners = _module()
    home, refs = {}, {}
    for stmt in tree.body:
        for name in _top_names(stmt):
            home.setdefault(name, _section_of(banners, stmt.lineno))
    for stmt in tree.body:
        local = _bound(stmt) - set(_top_names(stmt))
        loads = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)
                 and isinstance(n.ctx, ast.Load) and n.id in home and n.id not in local}
        for name in _top_names(stmt):
            refs.setdefault(name, set()).update(loads)
    return banners, home, refs


def _reach(refs, entries):
    seen, todo = set(), list(entries)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(refs[name])
    return seen


def journey_sections(journey):
    """The sections ``journey`` crosses, in file order (base excluded)."""
    banners, home, refs = _graph()
    entries, on_command_line = JOURNEYS[journey]
    crossed = {banners[home[n]][1] for n in _reach(refs, entries)}
    if on_command_line:
        crossed.add("Command line")
    return [s for s in SECTIONS if s in crossed and TIERS[s] != "base"]


def test_each_journey_crosses_at_most_four_sections():
    wide = {j: journey_sections(j) for j in JOURNEYS}
    assert wide == {
        "cron fetch": ["Fast path of an unchanged fetch", "Paths", "Fetch", "Command line"],
        "admin add-peer": ["Fast path of an unchanged fetch", "API routes", "Admin verbs",
                           "Command line"],
        "relayed packet": ["Relays", "API routes", "Paths"],
    }
    assert all(len(s) <= MAX_JOURNEY_SECTIONS for s in wide.values()), wide


def test_base_sections_are_shared():
    """A base section is reached (directly or through other base sections)
    from the sections of at least two of the three roles."""
    banners, home, refs = _graph()
    names = [b[1] for b in banners]
    users = {s: set() for s in SECTIONS}
    for name, section in home.items():
        tier = TIERS[names[section]]
        if tier in ("server", "client", "admin"):
            for n in _reach(refs, refs[name]):
                users[names[home[n]]].add(tier)
    lonely = {s: sorted(users[s]) for s in SECTIONS if TIERS[s] == "base"
              and len(users[s]) < 2 and s != "Imports and optional dependencies"}
    assert not lonely, lonely
