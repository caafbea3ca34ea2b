"""Relaying for peers that cannot accept connections (profile `relay: true`).

    forwarder = Forwarder(p2p, name="run.part", idle_timeout=30.0)
    await forwarder.serve()                              # a peer that accepts streams: forward for relayed peers
    await forwarder.accept_from([relay_id], handle)      # a relayed peer: take the streams its relays forward
    reader, writer = await forwarder.open(relay_id, target_id)

A relayed peer dials out to its relay (one of its bootstrap peers) and keeps that connection. A member that has to
reach it opens a stream to the relay that names the target; the relay opens a stream to the target over the target's
own connection, tells it who the stream is from (the peer libp2p authenticated on the first hop), and copies bytes both
ways until either side closes. The target believes that claim only from its own relays. Both hops are libp2p streams,
encrypted hop by hop: the relay sees what it forwards (with secure aggregation on, masked values only).

Why not libp2p's circuit relay v2 (hivemind's use_relay / use_auto_relay): the p2pd daemon of hivemind 1.1.12 resets
every relayed connection after 128 KiB in each direction and after 2 minutes, libp2p's default relay limits (its
-relayDataLimit and -relayTimeLimit settings lose to a second relay service it starts with the defaults). Measured
here: a reservation, a circuit and small RPCs work, and every transfer over 131,072 bytes is reset. That is enough to
coordinate a hole punch, not to average a model.

Wire format: the first hop starts with the target's peer id, the second with the source's (each a u16 length and the
id's bytes); then the stream is the forwarded protocol's own.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from hivemind.p2p import P2P, PeerID

__all__ = ["Forwarder", "split_maddr", "usable_relay"]

logger = logging.getLogger(__name__)

_U16 = struct.Struct("<H")
_CHUNK = 1 << 20
_MAX_ID = 128  # a libp2p peer id is 34-38 bytes

Handle = Callable[[asyncio.StreamReader, asyncio.StreamWriter, PeerID], Awaitable[None]]


class Forwarder:
    """Forwards streams to the peers relayed through this one, and opens streams to relayed peers."""

    def __init__(
        self, p2p: P2P, *, name: str, idle_timeout: float = 30.0, on_bytes: Callable[[int], None] | None = None
    ) -> None:
        self.p2p, self.name, self.idle_timeout = p2p, name, idle_timeout
        self.on_bytes = on_bytes  # told the size of every chunk this peer forwards, in either direction
        self._tasks: set[asyncio.Future[Any]] = set()

    async def serve(self) -> None:
        await self.p2p.add_binary_stream_handler(f"{self.name}.relay", self._forward)

    async def accept_from(self, relays: Sequence[PeerID], handle: Handle) -> None:
        """Take streams that `relays` forward; `handle(reader, writer, source)` serves each."""
        trusted = set(relays)

        async def relayed(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if info.peer_id not in trusted:
                logger.warning("refused a forwarded stream from %s, not one of this peer's relays", info.peer_id)
                writer.close()
                return
            try:
                source = await asyncio.wait_for(_read_id(reader), self.idle_timeout)
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as e:
                logger.debug("a forwarded stream without its source: %r", e)
                writer.close()
                return
            await handle(reader, writer, source)

        await self.p2p.add_binary_stream_handler(f"{self.name}.relayed", relayed)

    async def open(self, relay: PeerID, target: PeerID) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to `target` through `relay`, as if opened to the target itself."""
        if relay == self.p2p.peer_id:  # this peer is the target's relay: the second hop only
            _, reader, writer = await self.p2p.call_binary_stream_handler(target, f"{self.name}.relayed")
            writer.write(_id_bytes(relay))
            return reader, writer
        _, reader, writer = await self.p2p.call_binary_stream_handler(relay, f"{self.name}.relay")
        writer.write(_id_bytes(target))
        return reader, writer

    async def _forward(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target = await asyncio.wait_for(_read_id(reader), self.idle_timeout)
            opened = self.p2p.call_binary_stream_handler(target, f"{self.name}.relayed")
            _, far_reader, far_writer = await asyncio.wait_for(opened, self.idle_timeout)
        except Exception as e:  # the target is gone, or not relayed through this peer: the sender's read fails
            logger.debug("could not forward a stream from %s: %r", info.peer_id, e)
            writer.close()
            return
        far_writer.write(_id_bytes(info.peer_id))
        copies = [
            asyncio.ensure_future(self._copy(reader, far_writer)),
            asyncio.ensure_future(self._copy(far_reader, writer)),
        ]
        self._tasks.update(copies)
        try:
            await asyncio.gather(*copies, return_exceptions=True)
        finally:
            self._tasks.difference_update(copies)

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy until end of stream, an error or `idle_timeout` without a byte; then close the other side."""
        try:
            while chunk := await asyncio.wait_for(reader.read(_CHUNK), self.idle_timeout):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), self.idle_timeout)
                if self.on_bytes is not None:
                    self.on_bytes(len(chunk))
        except (TimeoutError, OSError) as e:
            logger.debug("forwarded stream ended: %r", e)
        finally:
            writer.close()


def _id_bytes(peer: PeerID) -> bytes:
    raw = peer.to_bytes()
    return _U16.pack(len(raw)) + raw


async def _read_id(reader: asyncio.StreamReader) -> PeerID:
    (n,) = _U16.unpack(await reader.readexactly(_U16.size))
    if not 0 < n <= _MAX_ID:
        raise ValueError(f"a peer id of {n} bytes")
    return PeerID(await reader.readexactly(n))


def split_maddr(maddr: str) -> tuple[str, str]:
    """(peer id, transport address) of a full multiaddr /.../p2p/PEER_ID."""
    address, peer_id = maddr.rstrip("/").rsplit("/p2p/", 1)
    return peer_id, address


async def usable_relay(relays: Sequence[tuple[str, str]], timeout: float, _dht: Any, node: Any) -> str | None:
    """In the DHT process: the first relay (peer id, multiaddr without its /p2p/ part) this peer's daemon is connected
    to, connecting to each in turn if it is not; None when none can be reached."""
    from hivemind.utils.multiaddr import Multiaddr

    connected = {str(p.peer_id) for p in await node.p2p.list_peers()}
    for peer_id, _ in relays:
        if peer_id in connected:
            return peer_id
    for peer_id, maddr in relays:
        try:
            await asyncio.wait_for(node.p2p._client.connect(PeerID.from_base58(peer_id), [Multiaddr(maddr)]), timeout)
            return peer_id
        except Exception as e:  # unreachable now: the next round asks again
            logger.debug("relay %s unreachable: %r", peer_id, e)
    return None
