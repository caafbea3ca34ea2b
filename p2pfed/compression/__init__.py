"""Compressors for averaging: each peer compresses its flat fp32 update, the group averages, peers decompress.

base.py            Compressor (compress/decompress, `linear`), LinearCompressor (shared basis), Payload (wire bytes)
none.py, fp16.py   Fp32 ("none"), Fp16 ("fp16"): fp32 as is, and half precision
uint8.py           Uint8 ("uint8"): 8-bit levels with a per-chunk (min, scale), stochastic rounding, no clamping
randomk.py, topk.py, powersgd.py   RandomK, TopK, PowerSGD: sparsification and low rank; error_feedback.py wraps any

    compressor = ErrorFeedback(make_compressor("randomk", ratio=0.01, seed=cfg.run.seed))
"""

from __future__ import annotations

import inspect
from typing import Any

from p2pfed.compression.base import Compressor, LinearCompressor, Payload
from p2pfed.compression.error_feedback import ErrorFeedback
from p2pfed.compression.fp16 import Fp16
from p2pfed.compression.none import Fp32
from p2pfed.compression.powersgd import PowerSGD
from p2pfed.compression.randomk import RandomK
from p2pfed.compression.topk import TopK
from p2pfed.compression.uint8 import Uint8

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "ErrorFeedback",
    "Fp16",
    "Fp32",
    "LinearCompressor",
    "Payload",
    "PowerSGD",
    "RandomK",
    "TopK",
    "Uint8",
    "make_compressor",
]

COMPRESSORS: dict[str, type[Compressor]] = {
    "none": Fp32,
    "fp16": Fp16,
    "uint8": Uint8,
    "randomk": RandomK,
    "topk": TopK,
    "powersgd": PowerSGD,
}


def make_compressor(name: str, **options: Any) -> Compressor:
    """The compressor registered as `name`, built from keyword options; ValueError names a bad name or option."""
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; valid compressors: {', '.join(COMPRESSORS)}")
    cls = COMPRESSORS[name]
    # A compressor's options are its keyword-only constructor arguments; checked here so a typo reads as one line.
    valid = list(inspect.signature(cls).parameters)
    for option in options:
        if option not in valid:
            raise ValueError(
                f"compressor {name!r} has no option {option!r}; valid options: {', '.join(valid) or '(none)'}"
            )
    try:
        return cls(**options)
    except ValueError as error:
        raise ValueError(f"compressor {name!r}: {error}") from None
