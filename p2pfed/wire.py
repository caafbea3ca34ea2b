"""The framing p2pfed's all-reduces put on a channel (p2pfed/butterfly.py, p2pfed/ring.py), little-endian.

    sent = await write_payload(channel, prefix, payload)        # prefix, then one payload; its size on the wire
    values, n = await read_piece(channel, codec, size, round)   # one payload decoded to (size,) fp32

A payload is its header-int count u8, the int32 header ints, the data length u64, and the data. Replies and ring
frames open with a status byte (OK, ERROR or NOT_JOINED followed by a UTF-8 reason, u32 length first; WAITING alone).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from p2pfed.channel import Channel
from p2pfed.compression import Compressor, Payload
from p2pfed.pieces import PartFailed

__all__ = [
    "ERROR", "MAX_PAYLOAD", "NOT_JOINED", "OK", "U8", "U16", "U32", "U64", "WAITING",
    "bytes_of", "read_blob", "read_payload", "read_piece", "write_payload",
]  # fmt: skip

U8, U16, U32, U64 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
MAX_PAYLOAD = 1 << 36  # a header claiming more than 64 GiB is not from a p2pfed peer
OK, ERROR, WAITING, NOT_JOINED = 0, 1, 2, 3  # statuses


async def write_payload(channel: Channel, prefix: bytes, payload: Payload) -> int:
    """Send one payload (after `prefix`); its size on the wire."""
    header = U8.pack(len(payload.header)) + struct.pack(f"<{len(payload.header)}i", *payload.header)
    head = prefix + header + U64.pack(len(payload.data))
    await channel.send(head, payload.data)
    return len(head) + len(payload.data)


async def read_blob(channel: Channel, *, limit: int) -> bytes:
    (n,) = U32.unpack(await channel.read_exactly(U32.size))
    if n > limit:
        raise PartFailed(f"a message of {n} bytes is over the limit of {limit}")
    return await channel.read_exactly(n)


async def read_piece(
    channel: Channel, codec: Compressor, size: int, round: int, *, into: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """One piece's (size,) fp32 values, decoded, and its size on the wire; in `into` when given. When the codec's wire
    form is the fp32 values themselves, they are read straight into their final memory. ValueError: a bad payload."""
    values = torch.empty(size, dtype=codec.dtype) if into is None and codec.raw else into
    payload, landed, wire = await read_payload(channel, codec, size, into=values)
    if landed:
        return values, wire  # type: ignore[return-value]
    decoded = codec.decompress(payload, numel=size, round=round)
    return (decoded, wire) if into is None else (into.copy_(decoded), wire)


async def read_payload(
    channel: Channel, codec: Compressor, size: int, *, into: torch.Tensor | None = None
) -> tuple[Payload, bool, int]:
    """One payload as it came, whether its bytes landed in `into` (a raw codec's fp32 values of the expected size:
    the payload is then a view of `into`), and its size on the wire."""
    (count,) = U8.unpack(await channel.read_exactly(1))
    header = struct.unpack(f"<{count}i", await channel.read_exactly(4 * count))
    (n,) = U64.unpack(await channel.read_exactly(U64.size))
    wire = 1 + 4 * count + U64.size + n
    if n > MAX_PAYLOAD:
        raise PartFailed(f"a payload of {n} bytes is over the limit")
    if into is not None and codec.raw and header == (size,) and n == 4 * size:
        view = bytes_of(into)
        await channel.read_into(view)
        return Payload(view, tuple(header)), True, wire
    data = np.empty(n, dtype=np.uint8)  # no zero fill: every byte is overwritten
    await channel.read_into(data.data)
    return Payload(data.data, tuple(header)), False, wire


def bytes_of(t: torch.Tensor) -> memoryview:
    """The writable bytes of a contiguous fp32 CPU tensor (a view of its memory)."""
    return t.numpy().data.cast("B")
