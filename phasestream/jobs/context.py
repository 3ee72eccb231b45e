"""Where a job reads and writes: a Tiled client, or a URI and key to connect with once (in a Dask task)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phasestream.store.tiled import connect, separate_api_key

__all__ = ["JobContext"]


@dataclass
class JobContext:
    """The Tiled server a job works on.

    ``client``: an open client (the live worker's); else one is opened on first use from
    ``tiled_uri`` and ``api_key`` (a key in the URI is moved into the header, docs/security.md).
    """

    tiled_uri: str | None = None
    api_key: str | None = None
    client: Any = None

    def __repr__(self) -> str:  # Dask logs the arguments of a failed task: never the key
        return f"JobContext(tiled_uri={self.tiled_uri!r})"

    def tiled(self) -> Any:
        """The Tiled client, connected on first use."""
        if self.client is None:
            uri, key = separate_api_key(self.tiled_uri or "", self.api_key)
            self.client = connect(uri or None, api_key=key)
        return self.client
