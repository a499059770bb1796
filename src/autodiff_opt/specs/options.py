"""The closed option lists that preflight checks and the code branches on (one copy each)."""

from __future__ import annotations

SKIP_UNITS: tuple[str, ...] = ("blocks", "sub_blocks")  # search.stage2.units (arch/layers.py)
CACHES: tuple[str, ...] = ("first_block", "taylorseer", "pab", "faster", "mag")  # search.stage2.caches (arch/caches.py)
PEERS: tuple[str, ...] = ("gits_dp", "ays")  # search.peers (search/peers.py)
