"""The byte channels under the all-reduce (p2pfed/channel.py) on real socket pairs: large tensors arrive intact in
their final memory, and a peer that closes or stalls fails the read with a reason instead of hanging.

.venv/bin/python -m pytest -q tests/test_channel.py
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from p2pfed.channel import Channel, SocketChannel, StreamChannel
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
