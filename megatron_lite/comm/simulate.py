"""Simulated tensor parallelism: N ranks as N threads of one process.

``ThreadCommunicator`` implements the Communicator primitives by exchanging tensors
through a shared slot list guarded by a ``threading.Barrier``. The quantized all-reduce
(comm/algorithms.py) is written against those primitives only, so a model run on
simulated ranks performs exactly the arithmetic of the real multi-process run: same
partial sums, same bytes on the "wire", same fixed-order fp32 sums. Results are equal
bit for bit (tests/test_allreduce.py checks it against gloo).

``run_simulated(fn, world_size, *args)`` calls ``fn(comm, *args)`` on every simulated
rank and returns the per-rank results. An exception on any rank aborts the barrier, so
the other ranks stop at their next collective instead of hanging; the first real error
is re-raised in the caller. ``timeout`` bounds one wait at a collective, not the run:
a rank that never reaches a collective breaks the barrier after ``timeout`` seconds, and
a rank still busy ``timeout`` seconds after the barrier broke is given up on. A healthy
run may take as long as it needs (an evaluation on a shared CPU can take hours).

torch runs each thread's ops in a shared intra-op pool; by default ``run_simulated``
gives every rank ``max(1, threads // world_size)`` threads for the duration of the run.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional

import torch

from megatron_lite.comm.communicator import Communicator
from megatron_lite.comm.transport import Transport, TransportInfo


class SimulationError(RuntimeError):
    """A simulated rank failed, or the ranks stopped meeting at the barrier."""


class _Hub:
    """What the simulated ranks share: one slot per rank and a barrier."""

    def __init__(self, world_size: int, timeout: float):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: List[Any] = [None] * world_size

    def collective(self, rank: int, obj: Any, read: Callable[[List[Any]], Any]) -> Any:
        """Post ``obj``, wait for every rank, compute ``read(all posted objects)``, wait
        again. ``read`` runs while every rank's posted tensor is still untouched (no rank
        returns to its caller before all ranks have finished reading)."""
        self.slots[rank] = obj
        self._wait()
        try:
            out = read(list(self.slots))
        except BaseException:
            self.barrier.abort()
            raise
        self._wait()
        return out

    def _wait(self) -> None:
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise SimulationError("another simulated rank failed or timed out") from None


class ThreadCommunicator(Communicator):
    """One simulated rank. ``all_reduce`` is the uncompressed baseline: an fp32 sum in
    rank order 0..N-1, cast back to the input dtype (identical on every rank)."""

    def __init__(self, rank: int, hub: _Hub):
        super().__init__(rank, hub.world_size)
        self.hub = hub
        self.process_group = None
        self.transport = TransportInfo(Transport.LOCAL, "simulated ranks: threads of one "
                                       "process")

    def all_reduce(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        if self.world_size == 1:
            return x
        def read(parts):
            acc = parts[0].float().clone()
            for p in parts[1:]:
                acc += p.float()
            return acc.to(x.dtype)
        return self.hub.collective(self.rank, x, read)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        return self.hub.collective(self.rank, x.contiguous(), lambda parts: torch.cat(parts, dim))

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor) -> None:
        w = self.world_size
        out = output.view(w, -1)

        def read(parts):
            for r, p in enumerate(parts):
                out[r].copy_(p.reshape(w, -1)[self.rank])
        self.hub.collective(self.rank, input.contiguous(), read)

    def all_gather_into_tensor(self, output: torch.Tensor, input: torch.Tensor) -> None:
        w = self.world_size
        out = output.view(w, -1)

        def read(parts):
            for r, p in enumerate(parts):
                out[r].copy_(p.reshape(-1))
        self.hub.collective(self.rank, input.contiguous(), read)

    def barrier(self) -> None:
        self.hub._wait()


def make_thread_communicators(world_size: int, timeout: float = 300.0) -> List[ThreadCommunicator]:
    """``world_size`` communicators sharing one hub (drive them from separate threads)."""
    hub = _Hub(world_size, timeout)
    return [ThreadCommunicator(r, hub) for r in range(world_size)]


def _join(threads: List[threading.Thread], hub: _Hub, errors: list, timeout: float) -> None:
    """Wait for every rank with no limit on the run's length. Once a rank has failed or
    the barrier broke, the others get ``timeout`` more seconds to stop (a rank stuck
    outside any collective never sees the broken barrier)."""
    deadline = None
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.2)
        if deadline is None and (hub.barrier.broken or any(e is not None for e in errors)):
            deadline = time.monotonic() + timeout
        if deadline is not None and time.monotonic() > deadline:
            if any(t.is_alive() for t in threads):
                hub.barrier.abort()
                stuck = [t.name for t in threads if t.is_alive()]
                raise SimulationError(f"simulated ranks {', '.join(stuck)} did not stop within "
                                      f"{timeout:.0f} s of a peer failing")


def run_simulated(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0,
                  num_threads: Optional[int] = None, wrap: Optional[Callable] = None) -> list:
    """Run ``fn(comm, *args)`` on ``world_size`` simulated ranks; return their results.

    ``wrap(comm)`` (optional) turns each ThreadCommunicator into the communicator ``fn``
    receives, e.g. ``lambda c: build_communicator(c, "int4:128")``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    comms = make_thread_communicators(world_size, timeout)
    results: List[Any] = [None] * world_size
    errors: List[Optional[BaseException]] = [None] * world_size

    def body(rank: int) -> None:
        try:
            comm = wrap(comms[rank]) if wrap is not None else comms[rank]
            results[rank] = fn(comm, *args)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors[rank] = exc
            comms[rank].hub.barrier.abort()

    prev = torch.get_num_threads()
    torch.set_num_threads(num_threads or max(1, prev // world_size))
    try:
        threads = [threading.Thread(target=body, args=(r,), name=f"sim-rank{r}", daemon=True)
                   for r in range(world_size)]
        for t in threads:
            t.start()
        _join(threads, comms[0].hub, errors, timeout)
    finally:
        torch.set_num_threads(prev)
    real = [(r, e) for r, e in enumerate(errors) if e is not None
            and not isinstance(e, SimulationError)]
    if real:
        rank, exc = real[0]
        raise SimulationError(f"simulated rank {rank} failed: {type(exc).__name__}: {exc}") from exc
    if any(e is not None for e in errors):
        raise SimulationError(str(next(e for e in errors if e is not None)))
    return results
