"""How a tensor's codes are laid out as bytes before a codec sees them (compress.layout), and fp16 data's byte shuffle.

Each stream of the blob gets the layout the planner (pack.plan_streams) finds smallest with its codec: a byte per
code row-major (`int8`), `bits` bits per code (`bitpack`), column-major (`col`), or rows in a similarity order, then
column-major, the order stored (`sorted`). A layout must round-trip exactly; unpack checks what it reads.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import PgolfError
from .registry import Registry
from .reorder import similarity_order


@dataclass(frozen=True)
class Layout:
    pack: Callable[[np.ndarray, int], bytes]  # (a tensor's int8 codes, 1-D or 2-D; bits) -> bytes
    unpack: Callable[[bytes, int, tuple[int, ...]], np.ndarray]  # (bytes, bits, shape) -> int8 codes of that shape
    size: Callable[[tuple[int, ...], int], int]  # (shape, bits) -> bytes


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Signed codes in [-2^(bits-1), 2^(bits-1)) as unsigned `bits`-bit fields, little-endian bit order."""
    u = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(-1)
    bitplanes = np.unpackbits(u[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bitplanes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count * bits]
    fields = np.zeros((count, 8), dtype=np.uint8)
    fields[:, :bits] = flat.reshape(count, bits)
    return (np.packbits(fields, axis=1, bitorder="little").reshape(-1).astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) if shape else 1


def _bytes_as(dtype) -> Callable[[bytes, int, tuple[int, ...]], np.ndarray]:
    return lambda d, b, shape: np.frombuffer(d, dtype=dtype)[:count(shape)].reshape(shape)


def _col_pack(codes: np.ndarray, bits: int) -> bytes:
    return np.ascontiguousarray(codes.T, dtype=np.int8).tobytes()


def _col_unpack(data: bytes, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int8)[:count(shape)].reshape(shape[::-1]).T


def _sorted_rows(shape: tuple[int, ...]) -> int:
    """Rows a `sorted` part stores an order for: a matrix's (a vector has none)."""
    return shape[0] if len(shape) == 2 else 0


def _sorted_pack(codes: np.ndarray, bits: int) -> bytes:
    """The rows' order (uint16) as a greedy chain of nearest rows, then the rows in that order, column-major."""
    if codes.ndim != 2:
        return _col_pack(codes, bits)
    if codes.shape[0] > 1 << 16:
        raise PgolfError(f"compress.layout: sorted stores a row order in 16 bits; a matrix of {codes.shape[0]} rows")
    order = similarity_order(torch.from_numpy(codes.astype(np.float32)), p=2).numpy()
    return order.astype("<u2").tobytes() + _col_pack(codes[order], bits)


def _sorted_unpack(data: bytes, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    rows = _sorted_rows(shape)
    if not rows:
        return _col_unpack(data, bits, shape)
    order = np.frombuffer(data[:2 * rows], dtype="<u2").astype(np.int64)
    if not np.array_equal(np.sort(order), np.arange(rows)):  # an index out of range, or one row twice
        raise ValueError("a stored row order is not a permutation of the rows")
    codes = np.empty(shape, dtype=np.int8)
    codes[order] = _col_unpack(data[2 * rows:], bits, (rows, *shape[1:]))
    return codes


LAYOUTS: Registry[Layout] = Registry("compress.layout")
LAYOUTS.add("int8", Layout(lambda c, b: c.astype(np.int8).tobytes(), _bytes_as(np.int8), lambda s, b: count(s)))
LAYOUTS.add("bitpack", Layout(pack_bits, lambda d, b, shape: unpack_bits(d, b, count(shape)).reshape(shape),
                              lambda s, b: (count(s) * b + 7) // 8))
# Column-major: a context model then sees one input channel's codes over all the rows (output channels) in a run,
# not one row's codes over the channels (issue 27's probe: 160 KB less ZPAQ over a 15.8 MB challenge model)
LAYOUTS.add("col", Layout(_col_pack, _col_unpack, lambda s, b: count(s)))
# Rows reordered so that similar rows are neighbours, then column-major; the order is stored (2 bytes a row, counted
# in the blob): for matrices whose rows no function-preserving order moves (the embedding; compress.reorder moves
# the others without storing anything)
LAYOUTS.add("sorted", Layout(_sorted_pack, _sorted_unpack, lambda s, b: count(s) + 2 * _sorted_rows(s)))
RAW = Layout(lambda c, b: c.tobytes(), _bytes_as(np.uint8), lambda s, b: count(s))


def layout(name: str) -> Layout:
    """A codes layout by name, or `raw` (bytes as they are: fp16 data)."""
    return RAW if name == "raw" else LAYOUTS[name]


def shuffle16(a: np.ndarray) -> bytes:
    b = np.ascontiguousarray(a, dtype="<f2").reshape(-1).view(np.uint8).reshape(-1, 2)
    return b.T.tobytes()


def unshuffle16(data: bytes) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8).reshape(2, -1)
    return np.ascontiguousarray(b.T).view("<f2").reshape(-1)
