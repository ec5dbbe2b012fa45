"""``python -m normzoo.bench``: the ``normzoo-bench`` command."""

from normzoo.bench.cli import main

raise SystemExit(main())
