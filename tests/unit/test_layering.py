"""The layering rule: every import points down (README, Architecture).

shared (errors, log, metrics, procs) < state < host < dns | lb < node < cli, and dns and
lb never import each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"shared": 0, "state": 1, "host": 2, "dns": 3, "lb": 3, "node": 4, "cli": 5}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "lb":
        return "lb"
    if parts[0] != "discovery":
        return ""
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "shared"


def imports_of(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            # `from discovery.host import netlink` imports discovery.host.netlink
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return {n for n in found if n.split(".")[0] in ("discovery", "lb")}


def modules():
    for path in sorted([*ROOT.glob("discovery/**/*.py"), *ROOT.glob("lb/*.py")]):
        relative = path.relative_to(ROOT).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        yield path, ".".join(parts)


def existing(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_every_import_points_down():
    violations = []
    for path, module in modules():
        mine = layer_of(module)
        for imported in imports_of(path, module):
            if not existing(imported) or imported in ("discovery",):
                continue
            theirs = layer_of(imported)
            if theirs == mine or theirs == "shared" and mine != "shared":
                continue
            sideways = {mine, theirs} == {"dns", "lb"}
            if sideways or LAYERS[theirs] >= LAYERS[mine]:
                violations.append(f"{module} ({mine}) imports {imported} ({theirs})")
    assert not violations, "imports that point up or sideways:\n" + "\n".join(sorted(violations))


def test_the_checker_sees_a_violation(tmp_path):
    # the rule above must be able to fail: a state module importing the resolver is caught
    bad = tmp_path / "bad.py"
    bad.write_text("from discovery.dns.resolver import Resolver\n")
    found = imports_of(bad, "discovery.state.bad")
    assert "discovery.dns.resolver" in found
    assert LAYERS[layer_of("discovery.dns.resolver")] > LAYERS[layer_of("discovery.state.bad")]


def test_cli_start_loads_no_heavy_library():
    """Commands that only talk to the agent must not pay for gRPC, pyroute2 or the registry."""
    code = ("import sys, discovery.cli.main as m; m.build_parser(); "
            "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] in "
            "('grpc', 'aetcd', 'pyroute2', 'iptc', 'asyncio', 'uvloop', 'dnslib') "
            "or n.startswith(('discovery.state.registry', 'discovery.state.etcd', 'discovery.host.netlink', "
            "'discovery.dns', 'lb')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"the CLI imports at start: {loaded}"
