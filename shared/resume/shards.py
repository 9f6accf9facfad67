"""Shards: which shard a client belongs to, and the lock each shard's run takes.

The shard is a pure function of the client id and the number of shards, so every instance
agrees on it without coordination, and it is stable while N stays the same.
"""

from __future__ import annotations

import hashlib


def shard_of(client_id: str, shards: int) -> int:
    """`int(sha256(clientId as UTF-8).hexdigest()[:8], 16) % shards`."""
    digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()
    return int(digest[:8], 16) % shards


def lock_name(base: str, shard: int | None) -> str:
    """Shard k's lock document id; the base name itself without shards."""
    return base if shard is None else f"{base}-shard-{shard}"


def base_name(name: str, shard: int | None) -> str:
    """The lock name that shard k's lock name was made from (`lock_name` undone)."""
    suffix = f"-shard-{shard}"
    return name[: -len(suffix)] if shard is not None and name.endswith(suffix) else name
