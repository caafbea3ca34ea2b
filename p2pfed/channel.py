"""One byte stream between two averagers, as the butterfly all-reduce uses it: a libp2p stream or a raw TCP socket.

    channel = StreamChannel(reader, writer, timeout=10.0)    # a libp2p stream (asyncio reader/writer pair)
    channel = SocketChannel(sock, timeout=10.0)              # averaging.transport=tcp: a connected socket
    head = await channel.read_exactly(13)
    await channel.read_into(memoryview_of_a_tensor)          # large data lands where it is used
    await channel.send(b"header", memoryview_of_a_tensor)    # and leaves from where it lives

Every read and write has its own deadline of `timeout` seconds (slow links move data in many short calls, each
within it); a stream that closes early or stalls raises PartFailed, which the all-reduce records as the round's
reason. SocketChannel reads straight into the caller's memory with recv_into and writes straight out of it, so on
the direct TCP transport a byte is copied only by the kernel; StreamChannel goes through asyncio's stream buffer.
"""

from __future__ import annotations

import asyncio
import socket
from abc import ABC, abstractmethod

from p2pfed.pieces import PartFailed

__all__ = ["IO_CHUNK", "Channel", "SocketChannel", "StreamChannel"]

IO_CHUNK = 1 << 20  # bytes per write call: each chunk has its own deadline, so a slow link fails only when it stalls


class Channel(ABC):
    def __init__(self, *, timeout: float) -> None:
        self.timeout = timeout

    @abstractmethod
    async def read_into(self, view: memoryview) -> None:
        """Fill `view` (writable, bytes) from the stream."""

    @abstractmethod
    async def send(self, *chunks: bytes | bytearray | memoryview) -> None:
        """Write the chunks in order and wait until the stream has taken them."""

    @abstractmethod
    async def linger(self) -> None:
        """Wait (at most `timeout`) until the other side closes or sends one more byte."""

    @abstractmethod
    def close(self) -> None: ...

    async def read_exactly(self, n: int) -> bytes:
        data = bytearray(n)
        await self.read_into(memoryview(data))
        return bytes(data)


class StreamChannel(Channel):
    """A libp2p stream from hivemind's P2P (or any asyncio StreamReader/StreamWriter pair)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.reader, self.writer = reader, writer

    async def read_exactly(self, n: int) -> bytes:
        try:
            return await asyncio.wait_for(self.reader.readexactly(n), self.timeout)
        except asyncio.IncompleteReadError:
            raise PartFailed("the stream closed early") from None
        except TimeoutError:
            raise PartFailed(f"no data for {self.timeout:.0f}s") from None

    async def read_into(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            try:
                chunk = await asyncio.wait_for(self.reader.read(min(IO_CHUNK, len(view) - pos)), self.timeout)
            except TimeoutError:
                raise PartFailed(f"no data for {self.timeout:.0f}s") from None
            if not chunk:
                raise PartFailed("the stream closed early")
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)

    async def send(self, *chunks: bytes | bytearray | memoryview) -> None:
        for chunk in chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), IO_CHUNK):
                self.writer.write(view[start : start + IO_CHUNK])
                await asyncio.wait_for(self.writer.drain(), self.timeout)
        await asyncio.wait_for(self.writer.drain(), self.timeout)

    async def linger(self) -> None:
        try:
            await asyncio.wait_for(self.reader.read(1), self.timeout)
        except (TimeoutError, OSError):
            pass

    def close(self) -> None:
        self.writer.close()


class SocketChannel(Channel):
    """A connected TCP socket driven by the event loop's sock_* calls: no stream buffer between kernel and tensor."""

    def __init__(self, sock: socket.socket, *, timeout: float) -> None:
        super().__init__(timeout=timeout)
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers must not wait for an ACK
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float) -> SocketChannel:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout=timeout)

    async def read_into(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            try:
                async with asyncio.timeout(self.timeout):
                    n = await self.loop.sock_recv_into(self.sock, view[pos:])
            except TimeoutError:
                raise PartFailed(f"no data for {self.timeout:.0f}s") from None
            if n == 0:
                raise PartFailed("the stream closed early")
            pos += n

    async def send(self, *chunks: bytes | bytearray | memoryview) -> None:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            for start in range(0, len(view), IO_CHUNK):
                try:
                    async with asyncio.timeout(self.timeout):
                        await self.loop.sock_sendall(self.sock, view[start : start + IO_CHUNK])
                except TimeoutError:
                    raise PartFailed(f"could not send for {self.timeout:.0f}s") from None

    async def linger(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.loop.sock_recv(self.sock, 1)
        except (TimeoutError, OSError):
            pass

    def close(self) -> None:
        self.sock.close()
