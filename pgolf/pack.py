"""The model blob: quantized tensors in one compressed, checksummed file, and the way back.

Blob = MAGIC | version u8 | codec u8 | sha256(payload) | compressed(payload)
payload = u32 header length | header JSON | tensor data
Header: layout, model config, and per tensor: name, kind (int | float), shape, bits, offsets.
Layouts: `int8` stores one code per byte, `bitpack` packs (code + qmax) into `bits` bits. fp16 data
(scales, float tensors) is byte-shuffled: all low bytes, then all high bytes.
"""

import hashlib
import json
import lzma
import struct
from collections.abc import Callable

import numpy as np
import torch

from .errors import PgolfError
from .quant import QuantResult, Quantized, qmax

MAGIC = b"PGOLFB"
VERSION = 1
CODECS = ("zstd", "brotli", "lzma")
LAYOUTS = ("int8", "bitpack")


def _zstd_compress(data: bytes) -> bytes:
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(22, enable_ldm=True, window_log=27)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def _zstd_decompress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor(max_window_size=1 << 27).decompress(data)


def _brotli_compress(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data, quality=11, lgwin=24)


def _brotli_decompress(data: bytes) -> bytes:
    import brotli

    return brotli.decompress(data)


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": _zstd_compress,
    "brotli": _brotli_compress,
    "lzma": lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME),
}
DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": _zstd_decompress,
    "brotli": _brotli_decompress,
    "lzma": lzma.decompress,
}


# ----------------------------------------------------------------------------- bit packing and shuffling

def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack signed codes in [-qmax, qmax] as unsigned `bits`-bit fields, little-endian bit order."""
    u = (codes.astype(np.int16) + qmax(bits)).astype(np.uint8).reshape(-1)
    bitplanes = np.unpackbits(u[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bitplanes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count * bits]
    fields = np.zeros((count, 8), dtype=np.uint8)
    fields[:, :bits] = flat.reshape(count, bits)
    return np.packbits(fields, axis=1, bitorder="little").reshape(-1).astype(np.int16) - qmax(bits)


def shuffle16(a: np.ndarray) -> bytes:
    b = np.ascontiguousarray(a, dtype="<f2").reshape(-1).view(np.uint8).reshape(-1, 2)
    return b.T.tobytes()


def unshuffle16(data: bytes) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8).reshape(2, -1)
    return np.ascontiguousarray(b.T).view("<f2").reshape(-1)


# ----------------------------------------------------------------------------- payload

def build_payload(result: QuantResult, layout: str, meta: dict) -> bytes:
    """Codes of every tensor first, then all fp16 data: like data sits together for the compressor."""
    entries, code_parts, half_parts = [], [], []
    code_off = half_off = 0

    def add_half(arr: np.ndarray) -> tuple[int, int]:
        nonlocal half_off
        raw = shuffle16(arr)
        half_parts.append(raw)
        half_off += len(raw)
        return half_off - len(raw), len(raw)

    for name in sorted(result.quantized):
        q = result.quantized[name]
        codes = q.codes.cpu().numpy()
        raw = codes.astype(np.int8).tobytes() if layout == "int8" else pack_bits(codes, q.bits)
        code_parts.append(raw)
        scale_off, scale_len = add_half(q.scale.cpu().numpy())
        entries.append({"name": name, "kind": "int", "shape": list(codes.shape), "bits": q.bits,
                        "codes": [code_off, len(raw)], "scale": [scale_off, scale_len]})
        code_off += len(raw)
    for name in sorted(result.floats):
        t = result.floats[name]
        off, n = add_half(t.cpu().float().numpy())
        entries.append({"name": name, "kind": "float", "shape": list(t.shape), "data": [off, n]})
    header = json.dumps({"layout": layout, "meta": meta, "codes_bytes": code_off, "tensors": entries},
                        sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + b"".join(code_parts) + b"".join(half_parts)


def parse_payload(payload: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    (hlen,) = struct.unpack_from("<I", payload, 0)
    header = json.loads(payload[4:4 + hlen])
    codes_base = 4 + hlen
    half_base = codes_base + header["codes_bytes"]
    state = {}
    for e in header["tensors"]:
        shape = tuple(e["shape"])
        count = int(np.prod(shape)) if shape else 1
        if e["kind"] == "int":
            off, n = e["codes"]
            raw = payload[codes_base + off:codes_base + off + n]
            codes = (np.frombuffer(raw, dtype=np.int8) if header["layout"] == "int8"
                     else unpack_bits(raw, e["bits"], count)).reshape(shape)
            soff, sn = e["scale"]
            scale = unshuffle16(payload[half_base + soff:half_base + soff + sn])
            q = Quantized(torch.from_numpy(codes.astype(np.int8)), torch.from_numpy(scale.copy()), e["bits"])
            state[e["name"]] = q.dequantize()
        else:
            off, n = e["data"]
            state[e["name"]] = torch.from_numpy(unshuffle16(payload[half_base + off:half_base + off + n]).astype(np.float32)).reshape(shape)
    return state, header["meta"]


# ----------------------------------------------------------------------------- blob

def encode(payload: bytes, codec: str) -> bytes:
    return MAGIC + bytes([VERSION, CODECS.index(codec)]) + hashlib.sha256(payload).digest() + COMPRESS[codec](payload)


def pack(result: QuantResult, meta: dict, codec: str = "auto", layout: str = "auto") -> tuple[bytes, dict[str, int]]:
    """The smallest blob over the allowed codecs and layouts; also returns every candidate's size."""
    codecs = CODECS if codec == "auto" else (codec,)
    layouts = LAYOUTS if layout == "auto" else (layout,)
    for value, allowed, key in ((codec, CODECS, "compress.codec"), (layout, LAYOUTS, "compress.layout")):
        if value != "auto" and value not in allowed:
            raise PgolfError(f"{key}: {value!r}; expected auto or one of {', '.join(allowed)}")
    best, sizes = None, {}
    for lay in layouts:
        payload = build_payload(result, lay, meta)
        for c in codecs:
            blob = encode(payload, c)
            sizes[f"{c}_{lay}"] = len(blob)
            if best is None or len(blob) < len(best):
                best = blob
    return best, sizes


def unpack(blob: bytes, where: str = "blob") -> tuple[dict[str, torch.Tensor], dict]:
    """Blob -> dequantized fp32 state dict and meta; the only way eval reads a model."""
    head = len(MAGIC) + 2 + 32
    if len(blob) < head or blob[:len(MAGIC)] != MAGIC:
        raise PgolfError(f"{where}: not a pgolf model blob (bad magic)")
    version, codec_id = blob[len(MAGIC)], blob[len(MAGIC) + 1]
    if version != VERSION:
        raise PgolfError(f"{where}: blob format version {version}, expected {VERSION}")
    if codec_id >= len(CODECS):
        raise PgolfError(f"{where}: unknown codec id {codec_id}")
    digest = blob[len(MAGIC) + 2:head]
    try:
        payload = DECOMPRESS[CODECS[codec_id]](blob[head:])
    except Exception as e:  # each codec raises its own error type on damaged input
        raise PgolfError(f"{where}: corrupted or truncated blob ({CODECS[codec_id]}: {type(e).__name__})") from None
    if hashlib.sha256(payload).digest() != digest:
        raise PgolfError(f"{where}: corrupted blob (payload sha256 mismatch)")
    try:
        return parse_payload(payload)
    except (ValueError, KeyError, struct.error, json.JSONDecodeError) as e:
        raise PgolfError(f"{where}: malformed blob header ({type(e).__name__})") from None
