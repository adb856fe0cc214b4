"""Hugging Face sources (``hf://``): the hub's LFS sha256 of each file is checked.

``HfFileSystem`` lists every LFS file with the sha256 the hub recorded for it
(``info["lfs"]["sha256"]``); the fetch computes it while writing (weightd/sources/
digests.py). Redirects to the hub's CDN are followed by huggingface_hub's own HTTP client,
inside the hub's trust: ``allowed_sources`` names repositories (``hf://org/``), not hosts.
"""

from __future__ import annotations

from typing import Any

from weightd.sources.base import SOURCE_CLASSES, Source
from weightd.sources.digests import from_hf_info


class HfSource(Source):
    """A model repository on the Hugging Face hub."""

    def _origin_digest(self, info: dict[str, Any]) -> str:
        digest = from_hf_info(info)
        return digest.text() if digest is not None else ""


SOURCE_CLASSES["hf"] = HfSource
