"""hivemind's butterfly all-reduce, made strict and measured.

hivemind's AllReduceRunner tolerates failures by averaging over whoever is left, and keeps a peer's own values for a
slice whose reducer vanished. p2pfed commits a round only when every contribution arrived, so `SwarmAverager` reports
for each round whether it was complete, together with the protobuf bytes it sent and received (payload plus framing
above libp2p), and the metadata each group member gathered. The averaged buffer is a scratch buffer: the trainer
applies it only when the round is complete, so a failed round never touches the model.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import multiprocessing as mp
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2

__all__ = ["COMPRESSIONS", "SwarmAverager"]

COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "uint8": Uniform8BitQuantization,
}


class _ByteCounters:
    """Counters shared between the averager process (which counts) and the peer process (which reads)."""

    def __init__(self) -> None:
        # Only the averager process writes them, from one event loop: no lock needed.
        self.sent: Any = mp.Value(ctypes.c_double, 0.0, lock=False)
        self.received: Any = mp.Value(ctypes.c_double, 0.0, lock=False)


async def _count(stream: AsyncIterator[Any], add: Callable[[int], None]) -> AsyncIterator[Any]:
    async for msg in stream:
        add(msg.ByteSize())
        yield msg


class _CountingStub:
    """Wraps a peer stub so that every averaging message in either direction is counted."""

    def __init__(self, stub: Any, runner: _CountingRunner, peer: str) -> None:
        self._stub, self._runner, self._peer = stub, runner, peer

    async def rpc_aggregate_part(self, inputs: AsyncIterator[Any], *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        sent = functools.partial(self._runner.add_sent, peer=self._peer)
        stream = await self._stub.rpc_aggregate_part(_count(inputs, sent), *args, **kwargs)
        return _count(stream, self._runner.add_received)


class _CountingRunner(AllReduceRunner):
    def __init__(self, *, counters: _ByteCounters, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.counters = counters
        self.bytes_sent = 0
        self.bytes_received = 0
        self.sent_by_peer: dict[str, int] = {}
        # A reducer's own result can be ready before its replies to the other peers have gone out; the round's
        # byte count waits for those streams to end.
        self._serving = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def add_sent(self, n: int, *, peer: str) -> None:
        self.bytes_sent += n
        self.sent_by_peer[peer] = self.sent_by_peer.get(peer, 0) + n
        self.counters.sent.value += n

    def add_received(self, n: int) -> None:
        self.bytes_received += n
        self.counters.received.value += n

    def _get_peer_stub(self, peer: PeerID) -> Any:
        return _CountingStub(super()._get_peer_stub(peer), self, peer.to_base58())

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        self._serving += 1
        self.idle.clear()
        try:
            async for msg in super().rpc_aggregate_part(_count(stream, self.add_received), context):
                self.add_sent(msg.ByteSize(), peer=context.remote_id.to_base58())
                yield msg
        finally:
            self._serving -= 1
            if self._serving == 0:
                self.idle.set()

    @property
    def complete(self) -> bool:
        """True when no sender was banned and no reducer failed: every slice averaged every member."""
        return not self.banned_senders and self.tensor_part_container.failed_size == 0


class SwarmAverager(DecentralizedAverager):
    """DecentralizedAverager whose step() returns a dict with the gathered metadata, completeness and bytes.

    `state_fn` runs in the peer process when another peer downloads state; it returns (metadata, tensors).
    """

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: Any,
        *,
        state_fn: Callable[[], tuple[Any, Sequence[torch.Tensor]]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._counters = _ByteCounters()
        self._state_fn = state_fn
        super().__init__(averaged_tensors, dht, **kwargs)

    @property
    def bytes_sent(self) -> int:
        return int(self._counters.sent.value)

    @property
    def bytes_received(self) -> int:
        return int(self._counters.received.value)

    def set_target_group_size(self, size: int) -> None:
        """Start all-reduce as soon as `size` peers have joined a group (else after the matchmaking time)."""
        self._outer_pipe.send(("_set_target_group_size", [size], {}))

    async def _set_target_group_size(self, size: int) -> None:
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        # The key manager only uses it to re-draw group bits, which p2pfed does not use ("" = one bucket); with a
        # fixed size it fails on any larger group ("Sample larger than population"), so let it follow the group.
        self._matchmaking.group_key_manager.target_group_size = None

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        self._last_runner: _CountingRunner | None = None
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        runner = self._last_runner
        if runner is not None:
            try:
                await asyncio.wait_for(runner.idle.wait(), timeout=self._allreduce_timeout or 30.0)
            except asyncio.TimeoutError:
                pass  # the result is in; a peer that stopped reading its replies only shortens the byte count
        return {
            "gathered": {peer.to_base58(): data for peer, data in gathered.items()},
            "complete": runner is not None and runner.complete,
            "bytes_sent": runner.bytes_sent if runner else 0,
            "bytes_received": runner.bytes_received if runner else 0,
            "sent_by_peer": dict(runner.sent_by_peer) if runner else {},
        }

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes | None = None, **kwargs: Any
    ) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        runner = _CountingRunner(
            counters=self._counters,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._last_runner = runner
        self._running_groups[group_id].set_result(runner)
        async for tensor, update in _azip(tensors, runner):
            tensor.add_(update)

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], Any]:
        if self._state_fn is None:
            return super().get_current_state()
        metadata, tensors = self._state_fn()
        return metadata, tensors, None


async def _azip(tensors: Sequence[torch.Tensor], runner: AsyncIterator[torch.Tensor]) -> AsyncIterator[Any]:
    it = iter(tensors)
    async for update in runner:
        yield next(it), update
