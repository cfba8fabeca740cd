"""Which requests a candidate gets: a keyed hash of the image bytes against the share.

Deterministic (the same image and seed always take the same route, so a client's retry sees
the same version) and uniform over distinct images, like a seeded coin per request.
"""
from __future__ import annotations

import hashlib


def in_share(data: bytes, share: float, seed: int = 0) -> bool:
    """True for about ``share`` of distinct inputs."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") < share * 2**64
