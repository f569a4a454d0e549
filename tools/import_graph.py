#!/usr/bin/env python3
# Usage: python3 tools/import_graph.py src   (prints module -> imported modules, then any import cycle)
"""Top-level module import graph of a Rust crate's src/ (from `use crate::x` and `crate::x::` paths), with its cycles."""
import re, sys, pathlib, itertools
src = pathlib.Path(sys.argv[1])
edges = {}
for f in src.rglob("*.rs"):
    rel = f.relative_to(src)
    mod = rel.parts[0].removesuffix(".rs")
    if mod in ("lib", "main"):
        continue
    text = re.sub(r"//.*", "", f.read_text())   # comments and doc links are not imports
    for m in re.findall(r"crate::([a-z_]+)", text):
        if m != mod and m != "proto":
            edges.setdefault(mod, set()).add(m)
for mod in sorted(edges):
    print(f"{mod:18} -> {' '.join(sorted(edges[mod]))}")
# cycles between two modules, and longer ones through strongly connected components
index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]
def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
sys.setrecursionlimit(10000)
for v in list(edges):
    if v not in index: visit(v)
print("import cycles (strongly connected groups):", sccs or "none")
