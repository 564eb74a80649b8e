"""Import circles and functions over 80 lines in a package (ast only): python scripts/check_structure.py [mobilenet_embed]."""
import ast, os, sys
root = sys.argv[1] if len(sys.argv) > 1 else "mobilenet_embed"
mods = {}
for dp, _, fs in os.walk(root):
    for f in fs:
        if f.endswith(".py"):
            path = os.path.join(dp, f)
            mod = path[:-3].replace(os.sep, ".")
            if mod.endswith(".__init__"):
                mod = mod[:-9]
            mods[mod] = path
graph = {m: set() for m in mods}
long = []
for m, path in mods.items():
    tree = ast.parse(open(path).read())
    pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t in mods and t != m:
                graph[m].add(t)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > 80:
                long.append((n, f"{path}:{node.lineno} {node.name}"))
# a package __init__ importing its submodules is not a circle: ignore edges pkg -> pkg.sub and sub -> pkg
def is_pkg_edge(a, b):
    return b.startswith(a + ".") or a.startswith(b + ".")
cycles = set()
def dfs(start, node, path, seen):
    for nxt in graph[node]:
        if is_pkg_edge(node, nxt):
            continue
        if nxt == start:
            cyc = path + [start]
            k = min(range(len(cyc) - 1), key=lambda i: cyc[i])
            cycles.add(tuple(cyc[k:-1] + cyc[:k]))
        elif nxt not in seen and nxt > start:
            seen.add(nxt)
            dfs(start, nxt, path + [nxt], seen)
for m in sorted(graph):
    dfs(m, m, [m], {m})
print("import cycles:", len(cycles))
for c in sorted(cycles):
    print("  " + " -> ".join(c + (c[0],)))
print("functions over 80 lines:", len(long))
for n, w in sorted(long, reverse=True):
    print(f"  {n:4d} {w}")
