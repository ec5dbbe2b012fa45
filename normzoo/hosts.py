"""normzoo's layers as ``norm_layer=`` factories of other libraries' models (torchvision, timm).

torchvision's ``resnet18(norm_layer=f)`` calls ``f(num_channels)``; timm's ``get_norm_layer``
accepts a class, a function or a ``functools.partial`` and keeps a partial's *keywords* only (its
positional arguments are dropped). :func:`norm_layer` returns such a partial of
:func:`normzoo.build_norm` with the name as a keyword, so both hosts call it with the size alone.
"""

from __future__ import annotations

import functools
from typing import Any

from normzoo.registry import build_norm, get_norm

__all__ = ["norm_layer"]


def norm_layer(name: str, **options: Any) -> functools.partial[Any]:
    """A ``norm_layer`` factory: ``norm_layer("gn", num_groups=8)(64)`` is
    ``build_norm("gn", 64, num_groups=8)``.

    The name is resolved now (an unknown name fails here, not deep inside a model's
    constructor); weight-kind entries (``weightnorm``) wrap a layer and are not norm layers.
    """
    spec = get_norm(name)
    if spec.kind == "weight":
        raise ValueError(
            f"norm {spec.name!r} reparametrises a conv/linear weight and is no norm_layer; "
            f"apply it with build_norm({spec.name!r}, module)"
        )
    return functools.partial(build_norm, name=spec.name, **options)
