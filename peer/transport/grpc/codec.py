"""Lossless chunk codecs of the exchange wire (``exchange.wire_codec``); no I/O, no protobuf.

``top-byte-huffman`` splits every element of a floating-point chunk into its most significant
byte (sign and the high exponent bits: a few distinct values in a trained network, about 2.7
bits of entropy in the digits MLP) and its other bytes (mantissa: close to random). Only the
first plane is entropy-coded, with zlib's Huffman-only deflate, which is 2x faster than
``deflate`` level 1 and compresses that plane better (0.34 against 0.43 of its size). A float32
chunk shrinks to about 0.83 of its size and a bfloat16 one to about 0.67, bit-exactly: the
receiver rebuilds the same bytes, so checksums, sizes and ranges all keep counting the payload.
Measured here on the 1.2 MB digits MLP: 2.1 ms to encode, 1.3 ms to decode the plane, and
about 0.7 ms per side to split and merge the planes (torch copies, which release the GIL).

Layout of one coded chunk of ``k`` elements of ``s`` bytes: one flag byte (:data:`DEFLATED`
or :data:`STORED`, when deflate would not shrink the plane), a varint length ``L``, ``L``
bytes of the coded top plane, then the ``s - 1`` other bytes of every element, in element
order (``k * (s - 1)`` bytes). The planes are byte positions, so the code is lossless on any
host; which byte is "top" is the little-endian one (every platform torch ships for).
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass

import torch

from peer.transport.grpc.framing import read_varint, varint

NONE = "none"
TOP_BYTE_HUFFMAN = "top-byte-huffman"
#: Values of ``exchange.wire_codec``.
WIRE_CODECS: tuple[str, ...] = (NONE, TOP_BYTE_HUFFMAN)

DEFLATED = 1
STORED = 0
_FLOATING = ("float64", "float32", "float16", "bfloat16")

# torch.frombuffer warns that a read-only buffer (a received chunk) gives a writable tensor;
# the views made of received chunks here are only read.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class CodecError(ValueError):
    """A coded chunk that cannot be decoded (the message names what is wrong)."""


def codec_for(dtype: str, configured: str) -> str:
    """The codec a payload of element type ``dtype`` travels in under ``exchange.wire_codec``.

    Returns ``""`` (raw bytes) for :data:`NONE` and for non-floating payloads, whose bytes
    have no exponent plane to code; sender and receiver both derive it, so they agree.

    Raises:
        CodecError: ``configured`` is not one of :data:`WIRE_CODECS` (or ``""``).
    """
    if configured in ("", NONE):
        return ""
    if configured not in WIRE_CODECS:
        raise CodecError(f"unsupported wire codec {configured!r} (known: {', '.join(WIRE_CODECS)})")
    return configured if dtype in _FLOATING else ""


def encode_parts(payload: memoryview | bytes | bytearray, itemsize: int) -> list[bytes | bytearray]:
    """The ``top-byte-huffman`` form of ``payload`` (whole elements of ``itemsize`` bytes), as
    consecutive pieces: joined once, by the caller, into the chunk message itself."""
    if itemsize < 2 or len(payload) % itemsize:
        raise ValueError(f"{len(payload)} bytes are not whole elements of {itemsize} bytes")
    count = len(payload) // itemsize
    if count == 0:
        return [bytes((STORED, 0))]
    elements = torch.frombuffer(payload, dtype=torch.uint8).view(count, itemsize)
    top = bytearray(count)
    torch.frombuffer(top, dtype=torch.uint8).copy_(elements[:, -1])
    packer = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    plane: list[bytes | bytearray] = [packer.compress(top), packer.flush()]
    flag = DEFLATED
    if sum(len(piece) for piece in plane) >= count:
        flag, plane = STORED, [top]
    rest = bytearray(count * (itemsize - 1))
    torch.frombuffer(rest, dtype=torch.uint8).view(count, itemsize - 1).copy_(elements[:, :-1])
    head = bytes((flag,)) + varint(sum(len(piece) for piece in plane))
    return [head, *plane, rest]


def encode(payload: memoryview | bytes | bytearray, itemsize: int) -> bytes:
    """The ``top-byte-huffman`` form of ``payload`` in one buffer (:func:`encode_parts` joined)."""
    return b"".join(encode_parts(payload, itemsize))


@dataclass(frozen=True)
class Coded:
    """A parsed coded chunk: its planes, not yet decoded (see :func:`parse`)."""

    flag: int
    top: memoryview
    rest: memoryview
    itemsize: int
    elements: int

    @property
    def size(self) -> int:
        """Decoded size in bytes."""
        return self.elements * self.itemsize


def parse(data: memoryview | bytes, itemsize: int) -> Coded:
    """Split a coded chunk into its planes and check their sizes (no decompression yet).

    Raises:
        CodecError: unknown flag, bad length, or a rest that splits an element.
    """
    view = memoryview(data)
    if itemsize < 2:
        raise CodecError(f"{TOP_BYTE_HUFFMAN} needs elements of 2 bytes or more, not {itemsize}")
    if len(view) < 2:
        raise CodecError(f"coded chunk of {len(view)} bytes has no header")
    flag = view[0]
    if flag not in (DEFLATED, STORED):
        raise CodecError(f"coded chunk with unknown flag {flag}")
    parsed = read_varint(view, 1)
    if parsed is None:
        raise CodecError("coded chunk with a truncated plane length")
    length, pos = parsed
    if pos + length > len(view):
        raise CodecError(
            f"coded chunk truncated: top plane of {length} bytes, {len(view) - pos} left"
        )
    rest = view[pos + length :]
    if len(rest) % (itemsize - 1):
        raise CodecError(f"coded chunk rest of {len(rest)} bytes splits a {itemsize}-byte element")
    elements = len(rest) // (itemsize - 1)
    if flag == STORED and length != elements:
        raise CodecError(f"stored top plane of {length} bytes for {elements} elements")
    return Coded(flag, view[pos : pos + length], rest, itemsize, elements)


def decode_into(coded: Coded, out: memoryview) -> None:
    """Write the decoded bytes of ``coded`` into ``out`` (writable, exactly ``coded.size``).

    Raises:
        CodecError: the top plane does not inflate to exactly one byte per element (corrupt,
            truncated or oversized data; inflation never produces more than that).
    """
    if len(out) != coded.size:
        raise ValueError(f"out has {len(out)} bytes, the chunk decodes to {coded.size}")
    if coded.elements == 0:
        return
    if coded.flag == DEFLATED:
        inflater = zlib.decompressobj(-15)
        try:
            top: bytes | memoryview = inflater.decompress(coded.top, coded.elements)
        except zlib.error as exc:
            raise CodecError(f"corrupt top plane ({exc})") from None
        if (
            len(top) != coded.elements
            or not inflater.eof
            or inflater.unconsumed_tail
            or inflater.unused_data
        ):
            raise CodecError(
                f"top plane inflates to {len(top)}{'+' if inflater.unconsumed_tail else ''} "
                f"bytes{'' if inflater.eof else ' (stream unfinished)'}, "
                f"expected {coded.elements}"
            )
    else:
        top = coded.top
    elements = torch.frombuffer(out, dtype=torch.uint8).view(coded.elements, coded.itemsize)
    rest = torch.frombuffer(coded.rest, dtype=torch.uint8).view(coded.elements, -1)
    elements[:, :-1].copy_(rest)
    elements[:, -1].copy_(torch.frombuffer(top, dtype=torch.uint8))
