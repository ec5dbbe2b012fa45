"""normzoo: from-scratch normalisation layers, a registry, Hydra sweeps and reports.

>>> import normzoo
>>> normzoo.list_norms()  # doctest: +SKIP
>>> gn = normzoo.build_norm("gn", 64, num_groups=8)
"""

from normzoo.registry import (
    NormSpec,
    UnknownNormError,
    build_norm,
    get_norm,
    list_norms,
    register_norm,
)

__version__ = "0.1.0"

__all__ = [
    "NormSpec",
    "UnknownNormError",
    "__version__",
    "build_norm",
    "get_norm",
    "list_norms",
    "register_norm",
]
