"""IPVS_CMD_SET_CONFIG as the kernel reads it (the IPVS lane checks the effect in a VM)."""

from __future__ import annotations

import struct

from pyroute2.netlink.generic import ipvs as genl

from lb.ipvs import set_tcp_timeout


class Recorder:
    prid = 42  # the genetlink family id the kernel would have given IPVS

    def __init__(self) -> None:
        self.sent: list = []

    def nlm_request(self, msg, msg_type, msg_flags):
        self.sent.append((msg, msg_type, msg_flags))
        return ()


def test_the_tcp_timeout_goes_as_a_u32_attribute_whatever_was_encoded_before():
    genl.ipvsmsg().encode()  # an ordinary IPVS message first: pyroute2 compiles the class once
    socket = Recorder()
    set_tcp_timeout(socket, 432000)
    (msg, msg_type, _), = socket.sent
    assert msg_type == 42
    msg.encode()
    assert msg.data[16] == genl.IPVS_CMD_SET_CONFIG, "genetlink command after the 16-byte netlink header"
    # the only attribute: length 8, type IPVS_CMD_ATTR_TIMEOUT_TCP (4), the seconds as host-order u32
    assert msg.data[20:] == struct.pack("=HHI", 8, 4, 432000)
