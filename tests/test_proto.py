"""The committed generated gRPC code matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

from pathlib import Path

from weightd.proto_gen import GENERATED, OUT_ROOT, PACKAGE_DIR, generate


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = generate(tmp_path)
    committed = OUT_ROOT / PACKAGE_DIR
    for name in GENERATED:
        assert (committed / name).read_bytes() == (out / name).read_bytes(), (
            f"{committed / name} is stale: run `make proto` and commit the result")
