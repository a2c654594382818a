"""A missing optional tool or kernel module never stops the agent: ``auto`` falls back from
IPVS to nftables to iptables and says once what to install."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from discovery.errors import SvcnetError
from discovery.host import nft
from lb import ipvs, sync


class _NoIpvsHere(type(Path())):
    """Path that sees neither /proc/net/ip_vs nor a modprobe binary."""

    def exists(self, **kwargs) -> bool:
        if str(self) == "/proc/net/ip_vs" or str(self).endswith("/modprobe"):
            return False
        return super().exists(**kwargs)


@pytest.fixture
def no_ipvs(monkeypatch):
    """Neither IPVS nor (unless a test says otherwise) nftables."""
    monkeypatch.setattr(ipvs, "Path", _NoIpvsHere)
    monkeypatch.setattr(nft, "nft_available", lambda: False)
    ipvs.ipvs_available.cache_clear()
    yield monkeypatch
    ipvs.ipvs_available.cache_clear()


def test_without_ipvs_auto_prefers_nftables(no_ipvs):
    no_ipvs.setattr(ipvs.shutil, "which", lambda name: None)
    no_ipvs.setattr(nft, "nft_available", lambda: True)
    assert sync.make_backend("auto", 30.0).name == "nftables"
    assert sync.make_backend("iptables", 30.0).name == "iptables"


def test_nftables_asked_for_but_missing_says_what_to_install(no_ipvs):
    with pytest.raises(SvcnetError, match="apt-get install libnftables1.*use --lb-backend iptables or auto"):
        sync.make_backend("nftables", 30.0)


def test_a_missing_libnftables_is_reported_once_with_the_package(monkeypatch, caplog):
    monkeypatch.setattr(nft.ctypes.util, "find_library", lambda name: "libnftables-missing.so.9")
    nft._lib.cache_clear()
    nft.nft_available.cache_clear()
    caplog.set_level(logging.WARNING, logger="discovery.host.nft")
    try:
        assert not nft.nft_available() and not nft.nft_available()
    finally:
        nft._lib.cache_clear()
        nft.nft_available.cache_clear()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "discovery.host.nft"]
    assert "install=libnftables1" in warning and "fallback=iptables" in warning


def test_no_modprobe_falls_back_to_iptables_and_says_what_to_install_once(no_ipvs, caplog):
    no_ipvs.setattr(ipvs.shutil, "which", lambda name: None)
    caplog.set_level(logging.WARNING, logger="lb.ipvs")
    assert sync.make_backend("auto", 30.0).name == "iptables"
    assert sync.make_backend("auto", 30.0).name == "iptables"
    warnings = [r.getMessage() for r in caplog.records if r.name == "lb.ipvs"]
    assert len(warnings) == 1, warnings
    assert "apt-get install kmod" in warnings[0] and "fallback=nftables_or_iptables" in warnings[0]
    with pytest.raises(SvcnetError, match="use --lb-backend nftables, iptables or auto"):
        sync.make_backend("ipvs", 30.0)


def test_a_kernel_without_ip_vs_falls_back_with_a_hint(no_ipvs, caplog):
    no_ipvs.setattr(ipvs.shutil, "which", lambda name: "/usr/sbin/modprobe")

    def modprobe(argv, **kwargs):
        assert argv == ["/usr/sbin/modprobe", "ip_vs"]
        return subprocess.CompletedProcess(argv, 1, "", "modprobe: FATAL: Module ip_vs not found")
    no_ipvs.setattr(ipvs.subprocess, "run", modprobe)
    caplog.set_level(logging.WARNING, logger="lb.ipvs")
    assert sync.make_backend("auto", 30.0).name == "iptables"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "lb.ipvs"]
    assert "no ip_vs module" in warning and "CONFIG_IP_VS" in warning


def test_a_modprobe_that_cannot_run_falls_back(no_ipvs, caplog):
    no_ipvs.setattr(ipvs.shutil, "which", lambda name: "/usr/sbin/modprobe")

    def broken(argv, **kwargs):
        raise PermissionError(13, "Permission denied")
    no_ipvs.setattr(ipvs.subprocess, "run", broken)
    caplog.set_level(logging.WARNING, logger="lb.ipvs")
    assert sync.make_backend("auto", 30.0).name == "iptables"
    assert any("modprobe ip_vs failed" in r.getMessage() for r in caplog.records)
