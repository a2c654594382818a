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


_FAKE_AGENT = '''
import json, os, socket, sys, threading
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(8)
print("ready", flush=True)
answers = {"/v1/info": {"prefix": "/svcnet", "pid": os.getpid()},
           "/v1/sandboxes": [{"name": "web1", "endpoints": [{"network": "front", "ipv4": "10.10.0.2"}],
                              "service": None, "status": "running", "pid": 42, "command": ["sleep", "9"]}]}
while True:
    conn, _ = server.accept()
    request = conn.recv(65536).decode()
    body = json.dumps(answers[request.split()[1]]).encode()
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
    conn.close()
'''


def test_ps_talks_to_the_agent_with_nothing_heavy_loaded(tmp_path):
    """`svcnet ps` end to end (against a stand-in agent on the socket): the listing is
    printed and the process never loaded gRPC, pyroute2, asyncio or the registry."""
    state = tmp_path / "state"
    state.mkdir()
    agent = subprocess.Popen([sys.executable, "-c", _FAKE_AGENT, str(state / "agent.sock")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert agent.stdout.readline().strip() == "ready"
        code = ("import sys; from discovery.cli.main import main; "
                f"sys.argv = ['svcnet', '--state-dir', {str(state)!r}, '--prefix', '/svcnet', 'ps']; "
                "code = main(); print('LOADED', ' '.join(sorted(n for n in sys.modules if n.split('.')[0] in "
                "('grpc', 'aetcd', 'pyroute2', 'iptc', 'asyncio', 'uvloop', 'dnslib') "
                "or n.startswith(('discovery.state.registry', 'discovery.state.etcd', 'discovery.host', "
                "'discovery.dns', 'lb'))))); sys.exit(code)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        listing, _, loaded = result.stdout.partition("LOADED")
        assert "web1" in listing and "10.10.0.2" in listing, listing
        assert loaded.split() == [], f"svcnet ps loaded: {loaded.split()}"
    finally:
        agent.kill()
        agent.wait()
