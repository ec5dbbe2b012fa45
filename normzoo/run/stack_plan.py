"""Which jobs of a sweep train together (issue 17): buckets by the overrides, split into stacks.

Two jobs of one sweep can share a stack when their overrides differ only in the member keys
(``norm``, ``norm.<option>``, ``seed``, ``optim.base_lr``): they compose from the same primary
config, and no norm option of ``conf/norm/`` writes outside ``norm``, so their configs then differ
only there too (the stack still checks :func:`normzoo.run.stack.group_key` of the composed
configs). A bucket is split into stacks of at most ``max_members`` runs, and further (halving the
largest) until there are ``stacks_per_worker`` stacks per worker, so that no core idles while one
large stack trains; the largest stacks are handed out first.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bucket_key", "plan_stacks"]

_MEMBER_PREFIXES = ("norm=", "norm.", "seed=", "optim.base_lr=")


def _is_member_override(override: str) -> bool:
    return override.lstrip("+~").startswith(_MEMBER_PREFIXES)


def bucket_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """The overrides a job shares with the other members of its bucket (sorted)."""
    return tuple(sorted(o for o in overrides if not _is_member_override(o)))


def _split(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` in ``parts`` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(indices), parts)
    out, start = [], 0
    for p in range(parts):
        stop = start + size + (p < extra)
        out.append(indices[start:stop])
        start = stop
    return out


def plan_stacks(
    job_overrides: Sequence[Sequence[str]],
    workers: int,
    max_members: int = 32,
    stacks_per_worker: int = 2,
) -> list[list[int]]:
    """The sweep's jobs (indices into ``job_overrides``) as stacks, largest first."""
    buckets: dict[tuple[str, ...], list[int]] = {}
    for i, overrides in enumerate(job_overrides):
        buckets.setdefault(bucket_key(overrides), []).append(i)
    stacks: list[list[int]] = []
    for indices in buckets.values():
        parts = -(-len(indices) // max(max_members, 1))
        stacks.extend(_split(indices, parts))
    target = max(workers, 1) * max(stacks_per_worker, 1)
    while len(stacks) < target:
        largest = max(stacks, key=len)
        if len(largest) < 2:
            break
        stacks.remove(largest)
        stacks.extend(_split(largest, 2))
    return sorted(stacks, key=len, reverse=True)
