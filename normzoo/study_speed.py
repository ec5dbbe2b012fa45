"""``normzoo-study-speed`` (the entry point ``normzoo.study_speed:main``): see
:mod:`normzoo.bench.study_speed`, where the code lives."""

from normzoo.bench.study_speed import (
    TIMES_FILE,
    compare_sweeps,
    default_pairs,
    main,
    run_sweep,
    write_report,
)

__all__ = ["TIMES_FILE", "compare_sweeps", "default_pairs", "main", "run_sweep",
           "write_report"]  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main())
