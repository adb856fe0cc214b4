"""Budgets of the residency tiers: parsing them and planning which models to evict.

Pure bookkeeping, shared by the host and the GPU tiers: it knows neither memory nor
leases, only numbers and keys the node hands it. The node builds a plan, shows it in
its log, then executes it (unloading models, least recently used first); a plan that
cannot succeed raises before anything is evicted.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

from weightd.config import format_size, parse_share, parse_size
from weightd.errors import BudgetExceeded

__all__ = ["DEFAULT_GPU_BUDGET", "parse_gpu_budget", "plan_eviction"]

K = TypeVar("K", bound=Hashable)


#: The GPU budget when none is configured: a share of each device, leaving room for the
#: CUDA contexts and the model servers' own allocations (activations, KV cache).
DEFAULT_GPU_BUDGET = "90%"


def parse_gpu_budget(value: str | int | None, total: int) -> int:
    """The bytes a budget setting allows on a device of ``total`` bytes.

    Args:
        value: bytes (``42949672960``), a size (``"40GiB"``) or a share of the device
            (``"90%"``, more than 0 and at most 100); None: :data:`DEFAULT_GPU_BUDGET`.
        total: the device's memory in bytes.

    Returns:
        The budget in bytes, at most ``total``.

    Raises:
        ConfigError: the value is not a size or a percentage in (0, 100].

    Example:
        >>> parse_gpu_budget("50%", 80 * 2**30) == 40 * 2**30
        True
        >>> parse_gpu_budget("40GiB", 80 * 2**30) == 40 * 2**30
        True
    """
    if total < 0:
        raise ValueError(f"a device cannot have {total} bytes")
    if value is None:
        value = DEFAULT_GPU_BUDGET
    share = parse_share(value) if isinstance(value, str) else None
    if share is not None:
        return int(total * share / 100)
    return min(parse_size(value), total)


def plan_eviction(need: int, used: int, budget: int,
                  candidates: Sequence[tuple[float, K, int, bool]], *,
                  what: str = "tier") -> list[K]:
    """Which models to evict, least recently used first, so that ``need`` more bytes fit.

    Args:
        need: bytes the new model adds.
        used: bytes the tier holds now.
        budget: bytes the tier may hold.
        candidates: ``(last_used, key, bytes, leased)`` for every resident model other
            than the one being loaded; ``bytes`` is what evicting it would free (blobs
            it shares with another resident model do not count). Leased models are
            never chosen.
        what: the tier, for the error message (``"cuda tier GPU-…"``).

    Returns:
        The keys to evict, in order: the shortest prefix of the unleased candidates,
        oldest first (ties by key), that makes ``used + need`` fit; empty when it fits.

    Raises:
        BudgetExceeded: even evicting every unleased model would not make room; the
            message says how many bytes are needed and how many are free.
        ValueError: a negative size.

    Example:
        >>> plan_eviction(10, 95, 100, [(2.0, "b", 8, False), (1.0, "a", 5, False)])
        ['a']
    """
    if need < 0 or used < 0 or budget < 0:
        raise ValueError(f"sizes cannot be negative: need={need} used={used} budget={budget}")
    if used + need <= budget:
        return []
    unleased = sorted((c for c in candidates if not c[3]), key=lambda c: (c[0], str(c[1])))
    plan: list[K] = []
    after = used
    for _, key, nbytes, _ in unleased:
        if nbytes < 0:
            raise ValueError(f"{key!r}: a model cannot free {nbytes} bytes")
        plan.append(key)
        after -= nbytes
        if after + need <= budget:
            return plan
    free = max(0, budget - used)
    evictable = used - after
    leased = sum(c[2] for c in candidates if c[3])
    raise BudgetExceeded(
        f"{what}: need {need} bytes ({format_size(need)}), {free} bytes free "
        f"({format_size(free)}) of a {budget}-byte ({format_size(budget)}) budget; evicting "
        f"every unleased model would free {evictable} bytes, {leased} bytes are leased")
