"""`none`: the update goes on the wire as fp32, as is; the reference the other compressors are measured against.

    payload = Fp32().compress(x, round=r)      # 4 bytes per element

Error bound: none, decompress(compress(x)) == x bit for bit. Linear (the identity basis), so a group may reduce and
mask its payloads directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2pfed.compression.base import LinearCompressor, check_round

__all__ = ["Fp32"]


@dataclass(kw_only=True)
class Fp32(LinearCompressor):
    """No compression: the k = numel coordinates are the fp32 values themselves."""

    raw = True
    elementwise = True

    def size(self, numel: int) -> int:
        return numel

    def encode(self, x: torch.Tensor, *, round: int) -> torch.Tensor:
        check_round(round)
        return x  # (numel,)

    def decode(self, values: torch.Tensor, *, numel: int, round: int) -> torch.Tensor:
        return values  # (numel,)
