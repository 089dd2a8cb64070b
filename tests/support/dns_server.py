"""A name server on 127.0.0.1 that answers one name with several A records, so a test can
give gRPC's ``dns://127.0.0.1:PORT/name:port`` target (its c-ares resolver asks the
authority named in the target) several sidecar hosts without touching /etc/hosts.

Every other question gets an empty NOERROR answer (AAAA, TXT...), an unknown name NXDOMAIN.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Sequence
from typing import cast

TYPE_A = 1
CLASS_IN = 1


def _question(packet: bytes) -> tuple[str, int, int]:
    """(name, end offset of the question, query type) of a one-question query."""
    labels, offset = [], 12
    while (length := packet[offset]) != 0:
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii").lower())
        offset += 1 + length
    qtype = struct.unpack("!H", packet[offset + 1 : offset + 3])[0]
    return ".".join(labels), offset + 5, qtype


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, name: str, addresses: Sequence[str]) -> None:
        self.name = name.lower().rstrip(".")
        self.addresses = [ipaddress.IPv4Address(a).packed for a in addresses]
        self.transport: asyncio.DatagramTransport | None = None
        self.questions: list[tuple[str, int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            name, end, qtype = _question(data)
        except (IndexError, struct.error, UnicodeDecodeError):
            return
        self.questions.append((name, qtype))
        known = name == self.name
        answers = self.addresses if known and qtype == TYPE_A else []
        flags = 0x8180 if known else 0x8183  # response, recursion desired+available; NXDOMAIN
        header = data[:2] + struct.pack("!HHHHH", flags, 1, len(answers), 0, 0)
        records = b"".join(struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 5, 4) + a for a in answers)
        assert self.transport is not None
        self.transport.sendto(header + data[12:end] + records, addr)


class DnsServer:
    """``async with DnsServer("sidecars.test", ["127.0.0.2", ...]) as dns: dns.port``."""

    def __init__(self, name: str, addresses: Sequence[str]) -> None:
        self._protocol = _Protocol(name, addresses)
        self._transport: asyncio.DatagramTransport | None = None
        self.port = 0

    @property
    def questions(self) -> list[tuple[str, int]]:
        return self._protocol.questions

    async def __aenter__(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self._protocol, local_addr=("127.0.0.1", 0))
        self._transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._transport is not None:
            self._transport.close()
