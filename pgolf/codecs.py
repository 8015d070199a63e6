"""Lossless codecs for the blob's streams. Each has a fixed id, the byte the blob stores to name it.

A codec is a compress function and a decompress function that never returns more than `limit` bytes (a
damaged or crafted stream cannot make the reader allocate more than the blob declares). Adding one is a
`Codec` with an unused id. ZPAQ (context mixing, as in records' `lrzip -z`) and PPMd come within a few
tenths of a percent of the order-0 entropy of quantized weights; zstd, brotli and lzma are the usual ones.

Rows quantized with a k · std(row) clip all follow one code distribution, so little context is left to model:
`zpaq_o1` runs libzpaq with a small model (order-0 ICM, order-1 ISSE, a mixer, an SSE stage) that lands on the
order-0 entropy of such codes at about ten times the speed of ZPAQ's level 5, in both directions.
"""

import io
import lzma
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import PgolfError
from .registry import Registry

PPMD_ORDER, PPMD_MEMORY = 2, 64 << 20
ZPAQ_O1 = "x4.0ci1ms"  # 16 MiB blocks, no transform; ICM order 0, ISSE order 1, mixer, SSE (libzpaq.h's syntax)


@dataclass(frozen=True)
class Codec:
    id: int  # stored in the blob: never reuse or renumber
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes, int], bytes]  # (data, limit) -> at most limit bytes
    decode_s_per_mib: float  # measured on one core (2 MiB of int6 codes); what auto weighs against bytes


CODECS: Registry[Codec] = Registry("compress.codec")


def _zstd_compress(data: bytes) -> bytes:
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(22, enable_ldm=True, window_log=27)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def _zstd_decompress(data: bytes, limit: int) -> bytes:
    import zstandard

    reader = zstandard.ZstdDecompressor(max_window_size=1 << 27).stream_reader(io.BytesIO(data))
    return reader.read(limit + 1)


def _brotli_compress(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data, quality=11, lgwin=24)


def _brotli_decompress(data: bytes, limit: int) -> bytes:
    import brotli

    d = brotli.Decompressor()
    out = d.process(data, output_buffer_limit=limit + 1)
    if not d.is_finished() and len(out) <= limit:
        raise brotli.error("truncated stream")
    return out


def _lzma_decompress(data: bytes, limit: int) -> bytes:
    d = lzma.LZMADecompressor()
    out = d.decompress(data, max_length=limit + 1)
    if not d.eof and len(out) <= limit:
        raise lzma.LZMAError("truncated stream")
    return out


def _zpaq_compress(data: bytes) -> bytes:
    import zpaq

    return zpaq.compress(data, level=5, threads=1)  # one block: the same bytes on any machine; pack runs chunks in parallel


def _zpaq_o1_compress(data: bytes) -> bytes:
    import zpaq

    return zpaq.compress(data, threads=1, method=ZPAQ_O1)


# libzpaq cannot stop early, and a few hundred KB of crafted ZPAQ decode to gigabytes: it decodes in a child process
# whose address space is capped (its model's memory plus a few times the declared size) and whose time is bounded.
ZPAQ_MEMORY = 320 << 20  # level 5's model takes about 200 MiB
ZPAQ_WORKER = ("import resource,sys;c=int(sys.argv[1]);resource.setrlimit(resource.RLIMIT_AS,(c,c));import zpaq;"
               "sys.stdout.buffer.write(zpaq.decompress(sys.stdin.buffer.read(),threads=1))")


def _zpaq_decompress(data: bytes, limit: int) -> bytes:
    cap = ZPAQ_MEMORY + 4 * limit
    p = subprocess.run([sys.executable, "-c", ZPAQ_WORKER, str(cap)], input=data, capture_output=True,
                       timeout=60 + 10 * limit / 2**20)
    if p.returncode:
        reason = p.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["killed"]
        raise ValueError(f"decoder stopped: {reason[0][:120]}")
    return p.stdout


def _ppmd_compress(data: bytes) -> bytes:
    import pyppmd

    return pyppmd.compress(data, max_order=PPMD_ORDER, mem_size=PPMD_MEMORY)


def _ppmd_decompress(data: bytes, limit: int) -> bytes:
    import pyppmd

    decoder = pyppmd.Ppmd8Decoder(max_order=PPMD_ORDER, mem_size=PPMD_MEMORY)
    out = decoder.decode(data, limit + 1)
    if not decoder.eof and len(out) <= limit:
        raise pyppmd.PpmdError("truncated stream")
    return out


CODECS.add("zstd", Codec(1, _zstd_compress, _zstd_decompress, 0.001))
CODECS.add("brotli", Codec(2, _brotli_compress, _brotli_decompress, 0.003))
CODECS.add("lzma", Codec(3, lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME), _lzma_decompress, 0.04))
CODECS.add("zpaq", Codec(4, _zpaq_compress, _zpaq_decompress, 3.3))
CODECS.add("ppmd", Codec(5, _ppmd_compress, _ppmd_decompress, 0.06))
CODECS.add("zpaq_o1", Codec(6, _zpaq_o1_compress, _zpaq_decompress, 0.42))
BY_ID = {c.id: name for name, c in CODECS.items()}


def compress(name: str, data: bytes) -> bytes:
    return CODECS[name].compress(data)


def decompress(codec_id: int, data: bytes, size: int, where: str) -> bytes:
    """Exactly `size` bytes from a stream, or a one-line error (unknown codec, damaged or wrong-sized stream)."""
    name = BY_ID.get(codec_id)
    if name is None:
        raise PgolfError(f"{where}: unknown codec id {codec_id}")
    try:
        out = CODECS[name].decompress(data, size)
    except Exception as e:  # each codec raises its own error type on damaged input
        detail = f"{type(e).__name__}: {e}" if isinstance(e, (ValueError, subprocess.TimeoutExpired)) else type(e).__name__
        raise PgolfError(f"{where}: corrupted or truncated blob ({name}: {detail.splitlines()[0][:200]})") from None
    if len(out) != size:
        raise PgolfError(f"{where}: corrupted blob ({name} stream holds {'more' if len(out) > size else 'fewer'} "
                         f"than the {size:,} bytes its header declares)")
    return out


def entropy_bytes(data: bytes) -> float:
    """Order-0 entropy of a byte string, in bytes: what a coder of independent symbols cannot beat."""
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / max(len(data), 1)
    return float(-(p * np.log2(p)).sum() * len(data) / 8)
