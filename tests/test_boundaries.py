"""The boundaries ../shared/DESIGN.md draws between weightd's parts, checked on what a
fresh interpreter imports."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest


def _imported_after(module: str, roots: set[str]) -> list[str]:
    code = (
        f"import sys; import {module}; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(roots)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return ast.literal_eval(out)


@pytest.mark.parametrize("module", ["weightd.store", "weightd.sources", "weightd.formats",
                                    "weightd.errors"])
def test_store_sources_and_formats_do_not_import_grpc_or_the_client(module: str) -> None:
    # They raise the same error classes the client re-raises, from weightd_errors.
    assert _imported_after(module, {"grpc", "weightd_client", "torch"}) == []


def test_the_daemon_needs_no_torch() -> None:
    assert _imported_after("weightd.server", {"torch"}) == []
