"""The saved-bytes memory probe: what autograd keeps for backward during one forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["saved_tensor_bytes"]


def saved_tensor_bytes(forward: Callable[[], Any]) -> int:
    """Bytes autograd keeps for backward while ``forward()`` runs.

    Every tensor packed by autograd (``ctx.save_for_backward``, built-in ops' saved inputs/outputs)
    is caught with ``torch.autograd.graph.saved_tensors_hooks``; the result is the sum of
    ``untyped_storage().nbytes()`` over the distinct storages (keyed by device and storage pointer).
    So a view counts its whole storage, two views of one storage count once, and a saved tensor that
    is the caller's input or a parameter counts too.
    """
    storages: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (
            RuntimeError,
            NotImplementedError,
        ):  # a tensor without storage (e.g. some subclasses)
            return t
        nbytes = storage.nbytes()
        if nbytes:
            storages[(str(t.device), storage.data_ptr())] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())
