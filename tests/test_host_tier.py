"""The host tier's bookkeeping of blobs shared between models: what a load needs and
what an unload frees, which the node's host budget plans with."""

from __future__ import annotations

from pathlib import Path

from weightd.tiers.host import HostTier


def _blobs(tmp_path: Path, sizes: list[int]) -> list[tuple[str, Path]]:
    out = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"blob{i}"
        p.write_bytes(bytes([i + 1]) * size)
        out.append((f"d{i}", p))
    return out


def _sized(blobs: list[tuple[str, Path]]) -> list[tuple[str, int]]:
    return [(d, p.stat().st_size) for d, p in blobs]


def test_blobs_shared_by_models_are_counted_once(tmp_path: Path) -> None:
    tier = HostTier(lock=False)
    shared, only_a, only_b = _blobs(tmp_path, [5000, 3000, 2000])
    assert tier.missing_bytes(_sized([shared, only_a])) == 8000
    assert tier.load("a", [shared, only_a]) == 8000
    # b needs only its own blob, named twice or not
    assert tier.missing_bytes(_sized([shared, only_b, only_b])) == 2000
    assert tier.load("b", [shared, only_b]) == 2000
    assert tier.bytes_used == 10_000
    # unloading a frees only what b does not also use: the plan must not count 8000
    assert tier.freeable_bytes("a") == 3000 and tier.model_bytes("a") == 8000
    assert tier.unload("a") == 3000
    assert tier.freeable_bytes("b") == 7000
    assert tier.unload("b") == 7000 and tier.bytes_used == 0
    tier.close()
