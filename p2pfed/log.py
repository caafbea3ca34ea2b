"""Logging with a per-peer prefix: `[peer 3fa9c1 step 120] message`.

The library logs; the CLI prints. hivemind's records go through the same handler, one line each: its expected
failures (a group not found, a peer gone) come with tracebacks that would bury the line that matters.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

__all__ = ["PeerContext", "setup_logging"]


class PeerContext:
    """Mutable prefix source: the peer id is known after the DHT starts, the step changes every round."""

    def __init__(self) -> None:
        self.peer = "------"
        self.step: int | None = None

    def prefix(self) -> str:
        return f"[peer {self.peer}]" if self.step is None else f"[peer {self.peer} step {self.step}]"


class _PrefixFormatter(logging.Formatter):
    def __init__(self, prefix: Callable[[], str], verbose: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        self._prefix, self._verbose = prefix, verbose

    def format(self, record: logging.LogRecord) -> str:
        if record.name.startswith("hivemind") and not self._verbose:
            record.exc_info, record.exc_text = None, None
            msg = record.getMessage().splitlines()[0] if record.getMessage() else ""
            record.msg, record.args = f"hivemind: {msg}", None
        line = super().format(record)
        stamp, _, rest = line.partition(" ")
        return f"{stamp} {self._prefix()} {rest}"


def setup_logging(ctx: PeerContext, *, level: str = "INFO", verbose: bool = False) -> None:
    """Route p2pfed and hivemind logs to stderr with the peer prefix."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrefixFormatter(ctx.prefix, verbose))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("hivemind").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    for noisy in ("transformers", "datasets", "asyncio", "filelock", "urllib3", "httpx", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
