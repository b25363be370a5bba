"""Every seed the pipeline derives from a run seed and a few parts, in one place.

Three formulas, because each is what one stage has always used and changing any of them
changes every output of that stage (the demo's figures and the seed-0 test bars):

- :func:`text_seed` (CCD's per-sample seeds): sha256 of the parts joined by ``/``, e.g.
  ``"0/<key>"`` and ``"0/<key>/retry1"``; 63 bits, big-endian.
- :func:`tuple_seed` (stage two's shard order and shuffle buffers): sha256 of ``repr`` of the
  integer tuple; 64 bits, little-endian.
- :func:`splitmix_seed` (DPA's batch order and per-step generators): a splitmix-style integer
  mix, no hashing; 63 bits.

They cannot be folded into one without changing outputs: the hashed text differs
(``"0/1"`` vs ``"(0, 1)"``), and so do the byte order and width.
"""

from __future__ import annotations

import hashlib

_M64 = 0xFFFFFFFFFFFFFFFF
_M63 = 0x7FFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15


def text_seed(*parts: object) -> int:
    """A 63-bit seed from ``"/".join(str(p) for p in parts)`` (stable across processes and platforms)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") & _M63


def tuple_seed(*parts: int) -> int:
    """A 64-bit seed from integers: sha256 of the tuple's ``repr`` (stable across processes and versions)."""
    return int.from_bytes(hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()[:8], "little")


def splitmix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style mixing), stable across runs and platforms."""
    x = _GOLDEN
    for p in parts:
        x = (x ^ (int(p) + _GOLDEN + (x << 6) + (x >> 2))) & _M64
        x = (x * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 31
    return x & _M63
