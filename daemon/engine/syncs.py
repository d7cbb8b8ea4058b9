"""Counting the device→host reads of a piece of engine code (each one stalls the CPU until the GPU catches up).

:class:`HostSyncCounter` is a torch function mode: inside it, every call that makes the host wait for a tensor's
value is counted by name, on any device, so a CPU run shows what a CUDA run would stall on. Counted: ``item``,
``tolist``, ``cpu``, ``to(cpu)``, a tensor's ``bool``/``int``/``float``/``index`` (Python control flow on a tensor)
and ``torch.cuda.synchronize``-style waits reported through :meth:`HostSyncCounter.note`. Not ``numpy``: it takes
only a CPU tensor (on CUDA it raises), so the wait is the ``cpu()`` before it, counted there.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncCounter"]

_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
}


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.total`` / ``syncs.by_kind``."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kind = _READS.get(func)
        if kind is None and func is torch.Tensor.to:
            kind = "to(cpu)" if _to_cpu(args, kwargs or {}) else None
        if kind is not None:
            self.by_kind[kind] += 1
        return func(*args, **(kwargs or {}))

    def note(self, kind: str) -> None:
        """Count a wait the mode cannot see (``torch.cuda.synchronize``, an event's ``synchronize``)."""
        self.by_kind[kind] += 1

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def _to_cpu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(target, (str, torch.device)):
        return torch.device(target).type == "cpu" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"
    return False
