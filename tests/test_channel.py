"""The byte channels under the all-reduce (p2pfed/channel.py) on real socket pairs: large tensors arrive intact in
their final memory, and a peer that closes or stalls fails the read with a reason instead of hanging. Sealed
channels (direct TCP in a run with a swarm key) carry the same bytes both ways, never in the clear, and a reader
rejects records under another key or altered on the way.

.venv/bin/python -m pytest -q tests/test_channel.py
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from p2pfed.channel import SEALED, Channel, SealedChannel, SocketChannel, StreamChannel
from p2pfed.pieces import PartFailed


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


async def _pair(kind: str, timeout: float) -> tuple[Channel, Channel]:
    """Two ends of a real loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    if kind == "socket":
        return SocketChannel(a, timeout=timeout), SocketChannel(b, timeout=timeout)
    ends = []
    for sock in (a, b):
        reader, writer = await asyncio.open_connection(sock=sock)
        ends.append(StreamChannel(reader, writer, timeout=timeout))
    return ends[0], ends[1]


@pytest.mark.parametrize("kind", ["socket", "stream"])
def test_a_tensor_sent_from_its_memory_arrives_bit_for_bit_in_the_receivers_tensor(kind: str) -> None:
    async def main() -> None:
        left, right = await _pair(kind, timeout=10.0)
        sent = torch.randn(3_000_001)  # 12 MB: many kernel-sized reads and several write chunks
        got = torch.empty_like(sent)

        async def receive() -> bytes:
            head = await right.read_exactly(4)
            await right.read_into(_bytes_of(got))
            return head

        _, head = await asyncio.gather(left.send(b"head", _bytes_of(sent)), receive())
        assert head == b"head"
        assert torch.equal(got, sent)
        left.close()
        right.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["socket", "stream"])
def test_a_peer_that_closes_early_or_stalls_fails_the_read(kind: str) -> None:
    async def main() -> None:
        left, right = await _pair(kind, timeout=0.5)
        await left.send(b"abc")
        left.close()
        with pytest.raises(PartFailed, match="closed early"):
            await right.read_exactly(4)
        right.close()

        left, right = await _pair(kind, timeout=0.5)
        await left.send(b"abc")  # then nothing, with the stream open
        with pytest.raises(PartFailed, match="no data"):
            await right.read_into(memoryview(bytearray(4)))
        left.close()
        right.close()

    asyncio.run(main())


class _Tap(Channel):
    """A socket channel that records what it sends, and can flip one byte of it on the way."""

    def __init__(self, inner: Channel, *, flip_at: int | None = None) -> None:
        super().__init__(timeout=inner.timeout)
        self.inner, self.flip_at, self.wire = inner, flip_at, bytearray()

    async def send(self, *chunks: bytes | bytearray | memoryview) -> None:
        for chunk in chunks:
            data = bytearray(chunk)
            at = None if self.flip_at is None else self.flip_at - len(self.wire)
            if at is not None and 0 <= at < len(data):
                data[at] ^= 0x01
            self.wire += data
            await self.inner.send(data)

    async def read_into(self, view: memoryview) -> None:
        await self.inner.read_into(view)

    async def linger(self) -> None:
        await self.inner.linger()

    def end_writes(self) -> None:
        self.inner.end_writes()

    async def drain(self, seconds: float) -> None:
        await self.inner.drain(seconds)

    def close(self) -> None:
        self.inner.close()


async def _sealed_pair(
    dial_key: bytes, accept_key: bytes, *, flip_at: int | None = None
) -> tuple[SealedChannel, SealedChannel, _Tap]:
    """A dialer and a listener sealed over a real loopback TCP connection, the dialer's bytes tapped."""
    left, right = await _pair("socket", timeout=5.0)
    tap = _Tap(left, flip_at=flip_at)
    dialer = await SealedChannel.dial(tap, dial_key)
    assert await right.read_exactly(len(SEALED)) == SEALED
    listener = await SealedChannel.accept(right, accept_key)
    return dialer, listener, tap


def test_a_sealed_channel_carries_tensors_both_ways_bit_for_bit_and_never_in_the_clear() -> None:
    async def main() -> None:
        key = bytes(range(32))
        dialer, listener, tap = await _sealed_pair(key, key)
        sent = torch.randn(1_500_007)  # 6 MB: several records, read across their boundaries
        got = torch.empty_like(sent)

        async def receive() -> bytes:
            head = await listener.read_exactly(5)
            await listener.read_into(_bytes_of(got)[:1000])  # part of a record, then the rest
            await listener.read_into(_bytes_of(got)[1000:])
            return head

        _, head = await asyncio.gather(dialer.send(b"head!", _bytes_of(sent)), receive())
        assert head == b"head!" and torch.equal(got, sent)
        # the reply leg, under the other direction's key
        back = torch.arange(300_000, dtype=torch.float32)
        echo = torch.empty_like(back)
        await asyncio.gather(listener.send(_bytes_of(back)), dialer.read_into(_bytes_of(echo)))
        assert torch.equal(echo, back)
        # what went over the wire is neither the header nor any 16 bytes of the tensor
        wire = bytes(tap.wire)
        plain = _bytes_of(sent).tobytes()
        assert len(wire) > len(plain) and b"head!" not in wire
        assert all(plain[i : i + 16] not in wire for i in range(0, len(plain), 400_000))
        dialer.close()
        listener.close()

    asyncio.run(main())


def test_a_sealed_record_under_another_key_or_altered_on_the_way_fails_the_read() -> None:
    async def main() -> None:
        key = bytes(32)
        dialer, listener, _ = await _sealed_pair(bytes([1]) + key[1:], key)  # a dialer without the swarm's key
        await dialer.send(b"P2PF" + bytes(100))
        with pytest.raises(PartFailed, match="not sealed with this swarm's key"):
            await listener.read_exactly(4)
        assert listener.records_read == 0
        dialer.close()
        listener.close()

        # one bit flipped in the first record's ciphertext (after SEALED, the nonce and the record's length)
        dialer, listener, _ = await _sealed_pair(key, key, flip_at=len(SEALED) + 16 + 4 + 10)
        await dialer.send(b"P2PF" + bytes(100))
        with pytest.raises(PartFailed, match="failed authentication"):
            await listener.read_exactly(4)
        dialer.close()
        listener.close()

    asyncio.run(main())
