"""`Sparse`: a lossless wire form for vectors that are mostly zeros (top-k outputs and their sums).

    payload = Sparse().compress(x, round=r)     # nonzeros as int32 index + fp32 value, or dense fp32 when shorter

Not a user choice: the averager uses it on the legs of a top-k round, where each peer's part holds at most k
nonzeros and a reducer's sum at most (peers * k). Exact: decompress(compress(x)) == x for finite fp32 x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pfed.compression.base import Compressor, Payload, flat32, pack, unpack

__all__ = ["Sparse"]

_DENSE, _SPARSE = 0, 1


@dataclass(kw_only=True)
class Sparse(Compressor):
    """No options. Header (form, nonzeros); indices are int32, so numel must be below 2**31."""

    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        flat = flat32(x)
        if flat.numel() >= 2**31:
            raise ValueError(f"sparse payloads use int32 indices, so numel must be < 2**31, got {flat.numel()}")
        where = flat.nonzero().view(-1)  # (nnz,)
        if 2 * where.numel() >= flat.numel():  # 8 bytes per nonzero against 4 per element
            return Payload(pack(flat), header=(_DENSE, flat.numel()))
        return Payload(pack(where.to(torch.int32), flat[where]), header=(_SPARSE, where.numel()))

    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        if len(payload.header) != 2 or payload.header[0] not in (_DENSE, _SPARSE):
            raise ValueError(f"sparse payload header must be (form, count), got {payload.header}")
        form, count = payload.header
        if form == _DENSE:
            (dense,) = unpack(payload, (_DENSE, numel), (np.float32, numel))
            return dense
        where, values = unpack(payload, (_SPARSE, count), (np.int32, count), (np.float32, count))
        if count and (int(where.min()) < 0 or int(where.max()) >= numel):
            raise ValueError(f"sparse payload has indices outside [0, {numel})")
        out = torch.zeros(numel, dtype=torch.float32)
        out[where.long()] = values
        return out
