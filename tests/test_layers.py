"""The package's import graph follows the layer order of DESIGN §2 (stdlib `ast`, no imports run).

Every `import` / `from ... import` anywhere in a module counts (function bodies too), and so do
package `__init__` files. A module may import its own top-level package or a lower layer, never
a sibling of its own layer nor anything above; there are no import cycles; library code never
imports the top-level `configs/` package (only `holocine_jax/config.py` reaches it, by name).
"""
from __future__ import annotations

import ast
import pathlib

import holocine_jax

# Lowest first. DESIGN §2 groups some of these on one line ("config, shots, prompts, flow, world",
# "text, vae, convert, checkpoint", "train, sample"); where one of a group imports another the
# group is split here so that the order is total between packages that import each other.
LAYERS = (
    ("config", "shots", "prompts", "flow", "files"),
    ("world",),                     # the synthetic world: film specs, cuts and captions
    ("parallel",),
    ("attention",),
    ("model",),
    ("convert", "checkpoint"),
    ("text", "vae"),                # their weight loaders use convert/'s layout helpers
    ("data",),
    ("sample",),
    ("train",),                     # validation films sample with the model being trained
    ("eval",),
    ("compile", "demo"),
    ("cli",),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
PACKAGE = "holocine_jax"
ROOT = pathlib.Path(holocine_jax.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:       # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if is_module(sub) else base))
    return sorted(set(found))


def graph() -> dict[str, list[tuple[int, str]]]:
    """module -> [(line, imported holocine_jax module)] over the whole package."""
    edges = {}
    for path in sorted(ROOT.rglob("*.py")):
        edges[module_name(path)] = [(line, target) for line, target in imports_of(path)
                                    if target == PACKAGE or target.startswith(PACKAGE + ".")]
    return edges


def top(module: str) -> str | None:
    """The layer unit of a module: `holocine_jax.attention.plan` -> `attention`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_has_a_layer():
    missing = sorted({top(m) for m in graph() if top(m) is not None and top(m) not in LAYER})
    assert not missing, f"modules with no layer in tests/test_layers.py LAYERS: {missing}"


def test_imports_follow_the_layers():
    bad = []
    for module, targets in graph().items():
        source = top(module)
        for line, target in targets:
            dest = top(target)
            if source is None:                       # holocine_jax/__init__.py: lowest layer only
                if dest is not None and LAYER.get(dest, 0) > 0:
                    bad.append(f"{module}:{line} -> {target}")
                continue
            if dest is None or dest == source or source not in LAYER or dest not in LAYER:
                continue
            if LAYER[dest] >= LAYER[source]:
                bad.append(f"{module}:{line} -> {target} ({source} is layer {LAYER[source]}, "
                           f"{dest} is layer {LAYER[dest]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = {m: sorted({t for _, t in ts if t != m}) for m, ts in graph().items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):                                   # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_library_never_imports_configs():
    bad = [f"{module_name(path)}:{line} -> {target}" for path in sorted(ROOT.rglob("*.py"))
           for line, target in imports_of(path) if target == "configs" or target.startswith("configs.")]
    assert not bad, "library code imports the top-level configs/ package:\n" + "\n".join(bad)
