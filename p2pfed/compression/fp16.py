"""`fp16`: the update goes on the wire as IEEE half precision, half the bytes of fp32.

    payload = Fp16().compress(x, round=r)      # 2 bytes per element

Error bound (round to nearest): |x - x̂| <= 2**-11 * |x| for |x| in fp16's normal range [2**-14, 65504], and
<= 2**-25 below it (half of the smallest subnormal step, 2**-24). |x| > 65504 becomes ±inf, which the averager
drops as a non-finite contribution: clip updates before compressing.

Not `linear`: averaging fp16 payloads in the compressed domain rounds the mean to fp16 once more, so it equals the
mean of the decompressed vectors only to within that extra rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pfed.compression.base import Compressor, Payload, check_round, flat32, pack, unpack

__all__ = ["Fp16"]


@dataclass(kw_only=True)
class Fp16(Compressor):
    """fp32 -> fp16 with round to nearest even; no options."""

    elementwise = True

    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        check_round(round)
        return Payload(pack(flat32(x).to(torch.float16)))  # (numel,) fp16

    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        (half,) = unpack(payload, (), (np.float16, numel))
        return half.to(torch.float32)
