"""Checksums and byte-range arithmetic of the exchange payloads (pure, no I/O, no protobuf).

Payload checksums are zlib CRC-32, computed once per published version. A receiver that fetches
a payload as several byte ranges in parallel checksums each range as it arrives and folds the
range CRCs together with :func:`crc32_combine`, so the whole-payload CRC is never recomputed.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def crc32(data: memoryview | bytes) -> int:
    """zlib CRC-32 of ``data`` (releases the GIL for large buffers)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (zlib's algorithm).

    Costs O(log length2) 32x32 GF(2) matrix products, independent of the data size.
    """
    if length2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if length2 & 1:
            crc1 = _gf2_times(even, crc1)
        length2 >>= 1
        if not length2:
            break
        odd = _gf2_square(even)
        if length2 & 1:
            crc1 = _gf2_times(odd, crc1)
        length2 >>= 1
        if not length2:
            break
    return (crc1 ^ crc2) & 0xFFFFFFFF


def chunk_count(length: int, chunk_bytes: int) -> int:
    """Number of chunks of at most ``chunk_bytes`` covering ``length`` bytes."""
    return -(-length // chunk_bytes)


def iter_chunks(payload: memoryview, chunk_bytes: int) -> Iterator[memoryview]:
    """Consecutive slices of ``payload`` of ``chunk_bytes`` (the last may be shorter)."""
    for start in range(0, len(payload), chunk_bytes):
        yield payload[start : start + chunk_bytes]


def split_ranges(total_bytes: int, parts: int, align: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of ``parts`` contiguous ranges covering ``total_bytes``.

    Range boundaries fall on multiples of ``align`` (the chunk size, so that every range but
    the last is a whole number of chunks); fewer ranges come back when the payload is small.
    """
    units = max(1, chunk_count(total_bytes, align))
    parts = max(1, min(parts, units))
    ranges, start = [], 0
    for index in range(parts):
        stop_unit = units * (index + 1) // parts
        stop = min(total_bytes, stop_unit * align)
        ranges.append((start, stop - start))
        start = stop
    return ranges
