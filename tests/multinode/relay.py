"""A slow, lossy wire: a SOCKS5 relay (what `zmq_proxy` points libzmq at) that holds every chunk it
forwards for `delay_s` (order kept, so it adds latency without capping bandwidth) and cuts a
connection now and then, both ways at once, dropping the chunk in hand (`drop_every`: every Nth
chunk it sees, counted over all connections). It runs its own event loop on a thread."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class RelayStats:
    connections: int = 0
    chunks: int = 0
    bytes: int = 0
    drops: int = 0
    targets: set[str] = field(default_factory=set)


class LossyRelay:
    def __init__(self, host: str, delay_s: float = 0.05, drop_every: int = 0):
        self.host, self.delay_s, self.drop_every = host, delay_s, drop_every
        self.stats = RelayStats()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="lossy-relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the relay did not start")
        assert self._server is not None
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, self.host, 0))
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # --- SOCKS5 (no authentication, CONNECT only) ---------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target = await _handshake(reader, writer)
            up_reader, up_writer = await asyncio.open_connection(*target)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            return
        writer.write(b"\x05\x00\x00\x01" + socket.inet_aton("0.0.0.0") + struct.pack(">H", 0))
        self.stats.connections += 1
        self.stats.targets.add(f"{target[0]}:{target[1]}")
        cut = asyncio.Event()
        pipes = [asyncio.ensure_future(self._pipe(reader, up_writer, cut)),
                 asyncio.ensure_future(self._pipe(up_reader, writer, cut))]
        try:
            await cut.wait()  # a drop, or one side ended (after its last chunk was delivered)
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
            await asyncio.gather(*pipes, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: asyncio.Event) -> None:
        """Forward each chunk delay_s after it came, in order, until this side ends or the cut."""
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await line.get()) is not None:
                await asyncio.sleep(max(0.0, item[0] + self.delay_s - time.monotonic()))
                writer.write(item[1])
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while chunk := await reader.read(65536):
                self.stats.chunks += 1
                if self.drop_every and self.stats.chunks % self.drop_every == 0:
                    self.stats.drops += 1
                    delivering.cancel()  # what is still on the line is lost with the connection
                    return
                self.stats.bytes += len(chunk)
                line.put_nowait((time.monotonic(), chunk))
            line.put_nowait(None)
            await delivering
        except (OSError, asyncio.CancelledError):
            delivering.cancel()
        finally:
            cut.set()


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[str, int]:
    version, methods = await reader.readexactly(2)
    await reader.readexactly(methods)
    if version != 5:
        raise ValueError("not SOCKS5")
    writer.write(b"\x05\x00")  # no authentication
    _, command, _, kind = await reader.readexactly(4)
    if command != 1:
        raise ValueError("only CONNECT")
    if kind == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif kind == 3:
        host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
    elif kind == 4:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    else:
        raise ValueError(f"address type {kind}")
    (port,) = struct.unpack(">H", await reader.readexactly(2))
    return host, port
