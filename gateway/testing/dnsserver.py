"""A small authoritative DNS server for tests and benchmarks, over UDP and TCP.

Serves records from a dict, in its own thread and event loop, so the gateway
under test (in-process or a subprocess) resolves through real DNS packets.
Names listed in ``servfail`` answer SERVFAIL; names in ``drop`` never answer
(a timeout); ``outage`` set to ``"servfail"`` or ``"drop"`` does the same for
every name until it is set back to ``None``. TXT values longer than 255 bytes
are split into character-strings as a real zone would carry them (RFC 1035
§3.3.14). A UDP answer that does not fit 512 bytes (no EDNS) is truncated (TC)
so clients retry over TCP.

    zone = {"example.com": [("TXT", "v=spf1 -all"), ("MX", "10 mx.example.com")]}
    with DNSServer(zone) as dns_server:
        config_nameserver = dns_server.address   # "127.0.0.1:PORT"
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DNSServer", "Records"]

Records = Mapping[str, Iterable[tuple[str, str]]]


def _rdata(rdtype: str, value: str) -> dns.rdata.Rdata:
    text = _txt_rdata(value) if rdtype in ("TXT", "SPF") else value
    return dns.rdata.from_text(
        dns.rdataclass.IN,
        dns.rdatatype.from_text(rdtype),
        text,
        origin=dns.name.root,
        relativize=False,
    )


def _txt_rdata(value: str) -> str:
    """A TXT value as quoted <=255-byte character-strings."""
    data = value.encode()
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    return " ".join(
        '"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks
    )


class DNSServer:
    """Authoritative for every name it holds and every name below ``zones``."""

    def __init__(
        self,
        records: Records | None = None,
        *,
        zones: Iterable[str] = (),
        servfail: Iterable[str] = (),
        drop: Iterable[str] = (),
        host: str = "127.0.0.1",
        ttl: int = 300,
    ) -> None:
        self.host = host
        self.port = 0
        self.ttl = ttl
        self.records: dict[str, list[tuple[str, str]]] = {}
        self.servfail = {n.lower().rstrip(".") for n in servfail}
        self.drop = {n.lower().rstrip(".") for n in drop}
        self.outage: str | None = None  # "servfail" | "drop": every name, until None
        self.zones = {z.lower().rstrip(".") for z in zones}
        self.queries: list[tuple[str, str, str]] = []  # (name, type, "udp"|"tcp")
        for name, recs in (records or {}).items():
            self.add(name, *recs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"

    def add(self, name: str, *records: tuple[str, str]) -> None:
        key = name.lower().rstrip(".")
        self.records.setdefault(key, []).extend((t.upper(), v) for t, v in records)

    def set(self, name: str, *records: tuple[str, str]) -> None:
        self.records[name.lower().rstrip(".")] = [(t.upper(), v) for t, v in records]

    # -- answering ---------------------------------------------------------

    def _known(self, qname: str) -> bool:
        if qname in self.records:
            return True
        # An empty non-terminal exists (NODATA, not NXDOMAIN): RFC 8020.
        suffix = "." + qname
        return any(n.endswith(suffix) for n in self.records)

    def _zone_of(self, qname: str) -> str:
        best = ""
        for z in self.zones | set(self.records):
            if (qname == z or qname.endswith("." + z)) and len(z) > len(best):
                best = z
        return best or qname

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            return self._answer(wire, transport)
        except Exception:  # a bad test record must show up as SERVFAIL, not silence
            query = dns.message.from_wire(wire)
            resp = dns.message.make_response(query)
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp.to_wire()

    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        q = query.question[0]
        qname = q.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((qname, qtype, transport))
        if qname in self.drop or self.outage == "drop":
            return None
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if qname in self.servfail or self.outage == "servfail":
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp.to_wire()
        recs = self.records.get(qname, [])
        cnames = [v for t, v in recs if t == "CNAME"]
        matches = [v for t, v in recs if t == qtype]
        if matches:
            rds = [_rdata(qtype, v) for v in matches]
            resp.answer.append(dns.rrset.from_rdata_list(q.name, self.ttl, rds))
        elif cnames and qtype != "CNAME":
            rd = _rdata("CNAME", cnames[0])
            resp.answer.append(dns.rrset.from_rdata_list(q.name, self.ttl, [rd]))
            target = dns.name.from_text(cnames[0]).to_text(omit_final_dot=True).lower()
            for t, v in self.records.get(target, []):
                if t == qtype:
                    rd2 = _rdata(qtype, v)
                    resp.answer.append(
                        dns.rrset.from_rdata_list(dns.name.from_text(cnames[0]), self.ttl, [rd2])
                    )
        else:
            if not self._known(qname):
                resp.set_rcode(dns.rcode.NXDOMAIN)
            zone = self._zone_of(qname)
            soa = _rdata("SOA", f"ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 60")
            resp.authority.append(dns.rrset.from_rdata_list(dns.name.from_text(zone), 60, [soa]))
        out = resp.to_wire()
        if transport == "udp" and len(out) > (query.payload if query.edns >= 0 else 512):
            resp.answer.clear()
            resp.flags |= dns.flags.TC
            out = resp.to_wire()
        return out

    # -- serving -----------------------------------------------------------

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class UDP(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: Any = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                out = server.answer(data, "udp")
                if out is not None:
                    self.transport.sendto(out, addr)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    out = server.answer(await reader.readexactly(size), "tcp")
                    if out is None:
                        continue
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        # UDP picks a free port; TCP must bind the same number, which another process may
        # hold (parallel suites): try again with a new port rather than never starting.
        for attempt in range(50):
            udp_transport, _ = await loop.create_datagram_endpoint(UDP, local_addr=(self.host, 0))
            self.port = udp_transport.get_extra_info("sockname")[1]
            try:
                tcp_server = await asyncio.start_server(tcp, self.host, self.port)
                break
            except OSError:
                udp_transport.close()
                if attempt == 49:
                    raise
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            udp_transport.close()
            tcp_server.close()
            with contextlib.suppress(Exception):
                await tcp_server.wait_closed()

    def start(self) -> DNSServer:
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="test-dns", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test DNS server did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
