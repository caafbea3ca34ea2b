"""Error feedback: keep what compression dropped and add it to the next round's input, so that nothing is lost for
good, only delayed (Seide et al., 2014; Karimireddy et al., 2019).

    compressor = ErrorFeedback(make_compressor("topk", ratio=0.01))
    payload = compressor.compress(update, round=r)           # compresses update + residual

After each compress, residual = (x + residual) - decompress(compress(x + residual)). Summed over rounds, the
decompressed outputs equal the summed inputs minus the current residual, so the averaged updates track the true ones
as long as the residual stays bounded; for a compressor that contracts, ||v - C(v)|| <= gamma ||v|| with gamma < 1
(top-k, unscaled random-k in expectation: gamma² = 1 - k / numel), ||residual|| <= gamma / (1 - gamma) * max ||x||.

The residual is per peer and lives on the CPU. compress() commits it at once: when the round then fails, what was
sent is lost while the residual still holds the rest; to lose nothing, add decompress(payload) back to `residual`.
"""

from __future__ import annotations

import torch

from p2pfed.compression.base import Compressor, Payload, flat32

__all__ = ["ErrorFeedback"]


class ErrorFeedback(Compressor):
    """Wraps any compressor; payloads are the inner compressor's, so linearity carries over."""

    def __init__(self, compressor: Compressor) -> None:
        self.inner = compressor
        self.linear = compressor.linear
        self.residual: torch.Tensor | None = None  # (numel,) fp32, what the last compress dropped

    def compress(self, x: torch.Tensor, *, round: int) -> Payload:
        flat = flat32(x)
        if self.residual is not None and self.residual.numel() != flat.numel():
            raise ValueError(f"error feedback holds a residual of {self.residual.numel()} elements, got {flat.numel()}")
        corrected = flat if self.residual is None else flat + self.residual  # (numel,)
        payload = self.inner.compress(corrected, round=round)
        self.residual = corrected - self.inner.decompress(payload, numel=flat.numel(), round=round)
        return payload

    def decompress(self, payload: Payload, *, numel: int, round: int) -> torch.Tensor:
        return self.inner.decompress(payload, numel=numel, round=round)

    def reset(self) -> None:
        """Forget the residual (e.g. after the model was restored from a checkpoint)."""
        self.residual = None
