"""Acceptance: `svcnet agent --docker` serving containers made by a real dockerd.

Containers run with ``--network none --dns 127.0.0.11`` and the ``svcnet.*`` labels, as
compose.yaml runs them. Queries are real `dig` inside the container's netns; traffic is
real TCP from the client container's netns through the VIP rules svcnet programs there.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest

from discovery.host.netns import entered_netns
from tests.docker.conftest import docker
from tests.helpers import metric_value, require_tools, wait

WEB = "hostname > /www/index.html && exec httpd -f -p 80 -h /www"


@pytest.fixture(autouse=True)
def _tools(docker_engine):
    require_tools("ip", "etcd", "dig", "nsenter", "iptables-nft")


@pytest.fixture
def lab(cli, test_image):
    """A svcnet network and `web` service; an agent following Docker; containers removed after."""
    made: list[str] = []
    lab = Lab(cli, test_image, made)
    cli.run("network", "create", lab.network, "--subnet", "10.123.0.0/24")
    cli.run("service", "create", "web", "--network", lab.network)
    cli.start_agent("--docker")
    yield lab
    if made:
        docker("rm", "-f", *made, check=False)


class Lab:
    def __init__(self, cli, image: str, made: list[str]) -> None:
        self.cli, self.image, self.made = cli, image, made
        self.network = cli.name("net")

    def run(self, suffix: str, *args: str, labels: dict[str, str] | None = None, command: str = WEB,
            network_mode: str = "none") -> str:
        """`docker run -d` a container of this run; returns its name."""
        name = self.cli.name(suffix)
        labels = {"svcnet.networks": self.network, **(labels or {})}
        label_args = [arg for key, value in labels.items() if value is not None for arg in ("-l", f"{key}={value}")]
        docker("run", "-d", "--init", "--name", name, "--network", network_mode, "--dns", "127.0.0.11",
               "-l", f"svcnet.test-run={self.cli.run_id}", *label_args, *args, self.image, "sh", "-c", command)
        self.made.append(name)
        return name

    def pid(self, name: str) -> int:
        return int(docker("inspect", "-f", "{{.State.Pid}}", name).stdout)

    def netns(self, name: str) -> str:
        return f"/proc/{self.pid(name)}/ns/net"

    def dig(self, name: str, *args: str) -> list[str]:
        result = subprocess.run(["nsenter", f"--net={self.netns(name)}", "dig", "@127.0.0.11", "+tries=1",
                                 "+time=2", "+short", *args], capture_output=True, text=True, timeout=20)
        return sorted(line for line in result.stdout.splitlines() if line and not line.startswith(";;"))

    def record(self, name: str) -> dict | None:
        return next((r for r in self.cli.json("ps") if r["name"] == name), None)

    def address(self, name: str) -> str:
        return self.record(name)["endpoints"][0]["ipv4"]

    def served(self, name: str) -> bool:
        record = self.record(name)
        return record is not None and record["status"] == "running"

    def http(self, client: str, address: str) -> str:
        """GET / from inside ``client``'s netns; the web container answers its hostname."""
        with entered_netns(self.netns(client)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(3)
            sock.connect((address, 80))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode().strip()

    def hostname(self, name: str) -> str:
        return docker("inspect", "-f", "{{.Config.Hostname}}", name).stdout.strip()


def test_labelled_containers_get_names_vip_and_probe(lab):
    webs = [lab.run(f"web{i}", labels={"svcnet.service": "web"}) for i in range(1, 4)]
    client = lab.run("client", labels={"svcnet.aliases": "probe-client"}, command="exec sleep 1000")
    plain = lab.run("plain", labels={"svcnet.networks": None}, command="exec sleep 1000")
    assert wait(lambda: all(lab.served(n) for n in [*webs, client]), 10), lab.cli.json("ps")

    assert lab.dig(client, "TXT", "probe.svcnet.internal") == ['"svcnet"'], "svcnet, not dockerd, owns 127.0.0.11"
    vip = lab.cli.json("service", "inspect", "web")["vips"][lab.network]
    assert lab.dig(client, "web") == [vip]
    tasks = sorted(lab.address(n) for n in webs)
    assert lab.dig(client, "tasks.web") == tasks
    assert lab.dig(webs[0], client) == lab.dig(webs[0], "probe-client") == [lab.address(client)]
    assert lab.dig(client, lab.hostname(webs[1])) == [lab.address(webs[1])], "Docker's hostname is a name too"
    assert lab.record(plain) is None, "an unlabelled container is not svcnet's"
    links = subprocess.run(["nsenter", f"--net={lab.netns(plain)}", "ip", "-o", "link"], capture_output=True,
                           text=True).stdout
    assert "eth0" not in links

    seen = Counter(lab.http(client, vip) for _ in range(60))
    assert set(seen) == {lab.hostname(n) for n in webs}, seen
    route = subprocess.run(["nsenter", f"--net={lab.netns(client)}", "ip", "route"], capture_output=True,
                           text=True).stdout
    assert route.startswith("default via 10.123.0.1"), "network_mode none: svcnet's network is the way out"
    text = lab.cli.metrics()
    assert metric_value(text, "svcnet_docker_connected") == 1
    assert metric_value(text, "svcnet_docker_containers") == 4


def test_restart_keeps_names_and_address_stop_and_rm_leave(lab):
    web = lab.run("web", labels={"svcnet.service": "web"})
    client = lab.run("client", command="exec sleep 1000")
    assert wait(lambda: lab.served(web) and lab.served(client), 10)
    address, pid = lab.address(web), lab.pid(web)

    docker("restart", "-t", "1", web)
    assert wait(lambda: lab.served(web) and lab.record(web)["pid"] != pid, 10), lab.record(web)
    assert lab.address(web) == address, "docker restart keeps the address"
    assert wait(lambda: lab.dig(client, "tasks.web") == [address], 5)
    assert lab.http(client, address) == lab.hostname(web)
    assert lab.dig(web, "TXT", "probe.svcnet.internal") == ['"svcnet"'], "served again in its new netns"

    docker("stop", "-t", "1", web)
    assert wait(lambda: lab.record(web)["status"].startswith("exited"), 5), lab.record(web)
    assert wait(lambda: lab.dig(client, "tasks.web") == [], 5), "a stopped container leaves the answers"
    pins = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if f"/netns/{web}" in line.split()[1]]
    assert pins == [], "its netns is let go"
    docker("start", web)
    assert wait(lambda: lab.served(web), 10)
    assert lab.address(web) == address, "stop + start keeps it too"
    assert wait(lambda: lab.dig(client, "tasks.web") == [address], 5)

    docker("rm", "-f", web)
    assert wait(lambda: lab.record(web) is None, 5), "removed with its container"
    keys = [key for key in lab.cli.registry_items() if f"/{web}" in key]
    assert keys == [], keys
    assert lab.dig(client, web) == []


def test_docker_healthcheck_decides_answers(lab):
    flag = "/tmp/ok"
    web = lab.run("web", "--health-cmd", f"test -e {flag}", "--health-interval", "1s", "--health-retries", "1",
                  labels={"svcnet.service": "web"})
    client = lab.run("client", command="exec sleep 1000")
    assert wait(lambda: lab.served(web) and lab.served(client), 10)
    assert lab.record(web)["health"] in ("starting", "unhealthy")
    assert lab.dig(client, "tasks.web") == [], "not yet healthy: not in the answers"

    docker("exec", web, "touch", flag)
    assert wait(lambda: lab.record(web)["health"] == "healthy", 10), lab.record(web)
    assert wait(lambda: lab.dig(client, "tasks.web") == [lab.address(web)], 5)

    docker("exec", web, "rm", flag)
    assert wait(lambda: lab.record(web)["health"] == "unhealthy", 10), lab.record(web)
    assert wait(lambda: lab.dig(client, "tasks.web") == [], 5), "unhealthy: out of the answers"
    vip = lab.cli.json("service", "inspect", "web")["vips"][lab.network]
    with pytest.raises(OSError):
        lab.http(client, vip)  # no healthy backend: the VIP refuses


def test_agent_restart_resyncs_what_changed_meanwhile(lab):
    stays = lab.run("stays", labels={"svcnet.service": "web"})
    stops = lab.run("stops", labels={"svcnet.service": "web"})
    goes = lab.run("goes", labels={"svcnet.service": "web"})
    assert wait(lambda: all(lab.served(n) for n in (stays, stops, goes)), 10)
    address = lab.address(stays)

    lab.cli.stop_agent(signal.SIGKILL)
    docker("stop", "-t", "1", stops)
    docker("rm", "-f", goes)
    late = lab.run("late", command="exec sleep 1000")
    lab.cli.start_agent("--docker")

    assert wait(lambda: lab.served(late), 10), "a container started while the agent was down is served"
    assert wait(lambda: lab.record(stops)["status"].startswith("exited"), 10), lab.record(stops)
    assert wait(lambda: lab.record(goes) is None, 10), "a container removed meanwhile is deregistered"
    assert lab.address(stays) == address
    assert wait(lambda: lab.dig(late, "tasks.web") == [address], 10)
    assert lab.http(late, lab.cli.json("service", "inspect", "web")["vips"][lab.network]) == lab.hostname(stays)


def test_lost_event_stream_is_resynced(lab, tmp_path):
    """The agent reaches dockerd through a proxy we cut: what happens meanwhile is caught up."""
    lab.cli.stop_agent()
    proxy = UnixProxy(tmp_path / "docker.sock", "/var/run/docker.sock")
    try:
        lab.cli.start_agent("--docker", f"unix://{proxy.path}")
        first = lab.run("first", labels={"svcnet.service": "web"})
        assert wait(lambda: lab.served(first), 10)
        proxy.cut()
        assert wait(lambda: metric_value(lab.cli.metrics(), "svcnet_docker_connected") == 0, 10)
        second = lab.run("second", command="exec sleep 1000")
        docker("rm", "-f", first)
        proxy.restore()
        assert wait(lambda: lab.served(second), 15), "started while the stream was lost"
        assert wait(lambda: lab.record(first) is None, 15), "removed while the stream was lost"
        assert metric_value(lab.cli.metrics(), "svcnet_docker_resyncs_total") >= 2
    finally:
        proxy.close()


def test_dockerd_forward_policy_drop_does_not_cut_svcnet(lab):
    """dockerd sets FORWARD's policy to DROP (in the nft tables, here) when it found forwarding off."""
    before = subprocess.run(["iptables-nft", "-w", "-S", "FORWARD"], capture_output=True, text=True).stdout
    policy = "DROP" if "-P FORWARD DROP" in before else "ACCEPT"
    subprocess.run(["iptables-nft", "-w", "-P", "FORWARD", "DROP"], check=True)
    try:
        web = lab.run("web", labels={"svcnet.service": "web"})
        client = lab.run("client", command="exec sleep 1000")
        assert wait(lambda: lab.served(web) and lab.served(client), 10)
        vip = lab.cli.json("service", "inspect", "web")["vips"][lab.network]
        assert wait(lambda: _answers(lab, client, vip), 15), "through the VIP despite DROP"
        assert lab.http(client, lab.address(web)) == lab.hostname(web)
        chain = subprocess.run(["iptables-nft", "-w", "-S", "DOCKER-USER"], capture_output=True, text=True).stdout
        assert "-j SVCNET-DKR-" in chain, chain
    finally:
        subprocess.run(["iptables-nft", "-w", "-P", "FORWARD", policy], check=True)


def test_bad_labels_are_refused_and_the_rest_served(lab):
    nowhere = lab.run("nowhere", labels={"svcnet.networks": "no-such-net"}, command="exec sleep 1000")
    badname = lab.run("badname", labels={"svcnet.name": "Not_A_Label"}, command="exec sleep 1000")
    good = lab.run("good", command="exec sleep 1000")
    assert wait(lambda: lab.served(good), 10)
    assert lab.record(nowhere) is None and lab.record("not_a_label") is None
    log = (lab.cli.state_dir / "agent.log").read_text()
    assert wait(lambda: "no-such-net" in (lab.cli.state_dir / "agent.log").read_text(), 5), log[-2000:]
    assert "svcnet.name" in (lab.cli.state_dir / "agent.log").read_text()
    assert lab.dig(good, "TXT", "probe.svcnet.internal") == ['"svcnet"']
    assert lab.dig(badname, "TXT", "probe.svcnet.internal") == [], "nobody answers there"


def _answers(lab, client: str, address: str) -> bool:
    try:
        return bool(lab.http(client, address))
    except OSError:
        return False


class UnixProxy:
    """A unix-socket relay to dockerd that a test can cut (a lost event stream, as the agent sees it)."""

    def __init__(self, path: Path, target: str) -> None:
        self.path, self.target = path, target
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self._conns += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self.cut()

