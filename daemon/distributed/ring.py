"""The ranks' communication: commands from rank 0 to all (a gloo group that may idle for hours), tensors between
neighbours (asynchronous point-to-point on the default group: NCCL on GPUs, gloo on the CPU), and the failure of a
peer turned into one clear exception instead of a hang."""

from __future__ import annotations

import datetime
import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..engine.interface import EngineFailure

__all__ = ["RankFailure", "Ring", "init_ring"]

log = logging.getLogger(__name__)

DATA_TIMEOUT = datetime.timedelta(minutes=10)
"""How long a tensor exchange may wait for a peer (the first forward of a large model included)."""
IDLE_TIMEOUT = datetime.timedelta(days=30)
"""How long a worker waits for the next command: a daemon may sit idle between streams for days."""
POLL_S = 0.0005
PEER_EXIT_WAIT_S = 2.0
"""After a failed transfer, how long to wait for a dying peer's exit status (to name it in the error)."""


class RankFailure(EngineFailure):
    """A rank of the pipeline died or stopped answering: the daemon cannot go on (every session needs every rank)."""


@dataclass
class Ring:
    """One rank's end of the pipeline's communication."""

    rank: int
    world: int
    device: torch.device
    control: Any  # the gloo process group of the commands
    peer_gone: Callable[[], str | None] = lambda: None
    """Rank 0's check of the worker processes it started: a description of one that exited, else ``None``."""

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world

    # ------------------------------------------------------------------ commands

    def broadcast(self, command: Any) -> Any:
        """Rank 0: send ``command`` to every rank; the others: wait for the next one and return it."""
        box = [command if self.rank == 0 else None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except Exception as exc:  # noqa: BLE001 - gloo says a peer closed its connection; name the failure
            raise self._failure("a command", exc) from exc
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, on every rank (small Python objects, on the command group)."""
        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, value, group=self.control)
        except Exception as exc:  # noqa: BLE001
            raise self._failure("a gather", exc) from exc
        return out

    # ------------------------------------------------------------------ tensors

    def send(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        """Start sending ``tensor`` to ``dst``; wait on the returned work before changing the tensor."""
        try:
            work = dist.isend(tensor.to(self.device).contiguous(), dst)
        except Exception as exc:  # noqa: BLE001
            raise self._failure(f"a send to rank {dst}", exc) from exc
        assert work is not None
        return work

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        """Receive a tensor of ``shape``/``dtype`` from ``src`` (both sides know it from the lockstep)."""
        out = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            work = dist.irecv(out, src)
        except Exception as exc:  # noqa: BLE001
            raise self._failure(f"a receive from rank {src}", exc) from exc
        assert work is not None
        self.wait(work, f"rank {src}")
        return out

    def send_object(self, obj: object, dst: int) -> None:
        """Send a small picklable object to ``dst`` (blocking)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(self.device)
        self.wait(self.send(torch.tensor([data.numel()], dtype=torch.int64, device=self.device), dst), f"rank {dst}")
        self.wait(self.send(data, dst), f"rank {dst}")

    def recv_object(self, src: int) -> Any:
        """Receive what ``send_object`` sent (from one of our own ranks)."""
        size = int(self.recv((1,), torch.int64, src).item())
        return pickle.loads(self.recv((size,), torch.uint8, src).cpu().numpy().tobytes())  # noqa: S301

    def wait(self, work: dist.Work, what: str) -> None:
        """Wait for ``work``. Gloo's own wait fails at once when a peer's connection closes (a dead rank); NCCL's
        would wait forever, so there the worker processes are checked meanwhile."""
        try:
            if self.device.type != "cuda":
                work.wait()  # gloo progresses a transfer only inside wait()
                return
            deadline = time.monotonic() + DATA_TIMEOUT.total_seconds()
            while not work.is_completed():
                gone = self.peer_gone()
                if gone is not None:
                    raise RankFailure(f"pipeline rank failed while waiting for {what}: {gone}")
                if time.monotonic() > deadline:
                    raise RankFailure(f"pipeline {what} sent nothing for {DATA_TIMEOUT}: it hangs")
                time.sleep(POLL_S)
            work.wait()
        except RankFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - gloo says a peer closed its connection; name the failure
            raise self._failure(f"a transfer with {what}", exc) from exc

    def _failure(self, what: str, exc: BaseException) -> RankFailure:
        gone = self.peer_gone()
        # A peer's sockets reset as its process dies, a moment before its exit status exists: wait for it, so the
        # error names the rank that died rather than gloo's "connection reset".
        deadline = time.monotonic() + PEER_EXIT_WAIT_S
        while gone is None and time.monotonic() < deadline:
            time.sleep(0.05)
            gone = self.peer_gone()
        why = gone if gone is not None else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return RankFailure(f"pipeline rank {self.rank} lost its peers during {what}: {why}")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_ring(rank: int, world: int, device: torch.device, *, address: str, port: int) -> Ring:
    """Join the process group of ``world`` ranks at ``address:port`` (rank 0 listens there)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world, timeout=DATA_TIMEOUT
    )
    # The commands get a gloo group of their own: the data group's timeout would end a worker idle between streams.
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    log.info("rank %d of %d joined (%s on %s)", rank, world, backend, device)
    return Ring(rank=rank, world=world, device=device, control=control)
