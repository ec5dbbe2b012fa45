"""The conformance suite a plugin author runs on a registered layer (issue 15, item 7).

>>> from normzoo.testing import assert_conforms
>>> assert_conforms("rmsnorm")  # doctest: +SKIP

See :mod:`normzoo.testing.conformance` for the checks and how an entry declares which apply.
"""

from normzoo.testing.conformance import (
    CHECKS,
    CheckResult,
    Conformance,
    assert_conforms,
    conformance_of,
    run_conformance,
)

__all__ = [
    "CHECKS",
    "CheckResult",
    "Conformance",
    "assert_conforms",
    "conformance_of",
    "run_conformance",
]
