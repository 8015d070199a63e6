"""The model blob: quantized tensors in one compressed, checksummed file, and the way back.

    blob    = MAGIC | version u8 | sha256(header + raw streams) | u32 packed header length | u32 header length
              | header (lzma) | stream 0 chunk 0 | stream 0 chunk 1 | ... | stream 1 chunk 0 | ...
    header  = JSON: model meta, chunk (raw bytes per chunk), streams [name, layout, codec id, raw bytes,
              [packed bytes of each chunk]], and per tensor its shape, bits and the (stream, offset, length)
              of each part

Like data sits together: one stream of codes per tensor group (attn, mlp, embed, other), one of LQER factor
codes, one of fp16 data (scales and float tensors, byte-shuffled: all low bytes, then all high bytes). Each
stream gets its own layout (`int8`: a byte per code; `bitpack`: `bits` bits per code) and codec, chosen by
compressing a sample with every allowed pair. A stream is cut into chunks of CHUNK raw bytes, each compressed
on its own, so that all cores compress and decompress (ZPAQ, the densest codec, does about 0.4 MB/s on a
core). Quantized weights hold no long-range repeats: the cut costs ZPAQ about 0.05 % (its model learns anew
in each chunk) and brotli nothing measurable.
"""

import concurrent.futures
import functools
import hashlib
import json
import lzma
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import codecs, layouts
from .config import CompressConfig
from .errors import PgolfError
from .io import write_bytes
from .quant import LowRank, Quantized, QuantResult, group_of
from .layouts import LAYOUTS, shuffle16, unshuffle16
from .registry import Registry
from .weights import build_model

MAGIC = b"PGOLFB"
VERSION = 3
HEAD = struct.Struct("<6sB32sII")  # magic, version, sha256, packed header length, header length
MAX_HEADER = 16 << 20
MAX_RAW = 1 << 30  # a blob may declare at most 1 GiB of raw streams (the challenge's are ~30 MB)
CHUNK = 2 << 20  # fixed, not derived from the host's cores: the same model gives the same blob on any machine
MIN_CHUNK = 64 << 10  # a read blob's chunks are no smaller: bounds their count (and the decode jobs) by MAX_RAW
SAMPLE_CHUNKS, SAMPLE_CHUNK = 4, 64 << 10  # what a codec trial compresses of a large stream
SERIAL_BELOW = 2 << 20  # jobs smaller than this in total run one after another


# ----------------------------------------------------------------------------- streams

class _Stream:
    """Parts appended in order; codes parts are kept as arrays until the layout is chosen."""

    def __init__(self, name: str, codes: bool):
        self.name, self.codes = name, codes
        self.parts: list[tuple[np.ndarray, int]] = []  # (int8 codes, bits) or (uint8 bytes, 0)

    def add(self, arr: np.ndarray, bits: int = 0) -> int:
        self.parts.append((arr, bits))
        return len(self.parts) - 1

    def build(self, layout: layouts.Layout) -> tuple[bytes, list[tuple[int, int]]]:
        chunks, spans, off = [], [], 0
        for arr, bits in self.parts:
            raw = layout.pack(arr, bits)
            chunks.append(raw)
            spans.append((off, len(raw)))
            off += len(raw)
        return b"".join(chunks), spans


_TYPE_PARTS = {".attn.q.": "q", ".attn.k.": "k", ".attn.v.": "v", ".attn.proj.": "o", ".mlp.fc.": "fc",
               ".mlp.proj.": "proj"}


def matrix_type(name: str) -> str:
    """q, k, v, o, fc, proj, embed or other: what a matrix is, for a code stream of each type."""
    other = "embed" if group_of(name) == "embed" else "other"
    return next((t for part, t in _TYPE_PARTS.items() if part in name), other)


# compress.streams: which code stream a tensor's codes go to; `type` keeps one distribution per stream
STREAMINGS: Registry[Callable[[str], str]] = Registry("compress.streams")
STREAMINGS.add("group", group_of)  # attn, mlp, embed, other
STREAMINGS.add("type", matrix_type)


def code_stream(name: str, streams: str) -> str:
    return f"codes.{STREAMINGS[streams](name)}"


def _streams(result: QuantResult, grouping: str = "group") -> tuple[dict[str, _Stream], list[dict]]:
    """The blob's streams (codes per compress.streams `grouping`, LQER factors, fp16 data) with the tensor entries
    pointing into them as (stream, part index)."""
    streams = {key: _Stream(key, True) for key in sorted({code_stream(n, grouping) for n in result.quantized})}
    streams["lqer"], streams["fp16"] = _Stream("lqer", True), _Stream("fp16", False)

    def half(arr) -> tuple[str, int]:
        return "fp16", streams["fp16"].add(np.frombuffer(shuffle16(arr.cpu().float().numpy()), dtype=np.uint8))

    entries = []
    for name in sorted(result.quantized):
        q = result.quantized[name]
        s = code_stream(name, grouping)
        e = {"name": name, "kind": "int", "shape": list(q.codes.shape), "bits": q.bits,
             "codes": (s, streams[s].add(q.codes.cpu().numpy(), q.bits)), "scale": half(q.scale)}
        if q.lqer is not None:
            lq = q.lqer
            e["lqer"] = {"rank": lq.a_codes.size(1), "group": lq.b_codes.numel() // lq.b_scale.numel(),
                         "a": ("lqer", streams["lqer"].add(lq.a_codes.cpu().numpy(), 2)), "a_scale": half(lq.a_scale),
                         "b": ("lqer", streams["lqer"].add(lq.b_codes.cpu().numpy(), 4)), "b_scale": half(lq.b_scale)}
        entries.append(e)
    for name in sorted(result.floats):
        t = result.floats[name]
        entries.append({"name": name, "kind": "float", "shape": list(t.shape), "data": half(t)})
    return {n: s for n, s in streams.items() if s.parts}, entries


def _sample(data: bytes) -> bytes:
    if len(data) <= SAMPLE_CHUNKS * SAMPLE_CHUNK:
        return data
    step = len(data) // SAMPLE_CHUNKS
    return b"".join(data[i * step:i * step + SAMPLE_CHUNK] for i in range(SAMPLE_CHUNKS))


def _in_parallel(work: Callable[[tuple], bytes], jobs: list[tuple], sizes: list[int]) -> list[bytes]:
    """work(job) for each job, on threads (zstd, brotli, lzma and ZPAQ release the GIL), largest first; in order."""
    if sum(sizes) < SERIAL_BELOW:
        return [work(j) for j in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -sizes[i])
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        done = dict(zip(order, pool.map(lambda i: work(jobs[i]), order)))
    return [done[i] for i in range(len(jobs))]


class ChunkCache:
    """Compressed chunks on disk by codec and content. The quantize stage packs the whole blob to check its size,
    then compress packs the same streams again, at seconds a chunk for ZPAQ: with one cache folder the second
    pack compresses nothing. A file holds the sha256 of the packed bytes and the packed bytes (one that does not
    match is compressed again); past `limit` bytes the least recently used files go."""

    def __init__(self, folder: Path, limit: int = 512 << 20):
        self.folder, self.limit = Path(folder), limit

    def key(self, codec: str, data: bytes) -> str:
        return hashlib.sha256(_codecs_source() + codec.encode() + b"\0" + data).hexdigest()

    def get(self, key: str) -> bytes | None:
        try:
            held = (self.folder / key).read_bytes()
        except OSError:
            return None
        if hashlib.sha256(held[32:]).digest() != held[:32]:
            return None
        os.utime(self.folder / key)
        return held[32:]

    def put(self, packed: dict[str, bytes]) -> None:
        for key, data in packed.items():
            write_bytes(self.folder / key, hashlib.sha256(data).digest() + data)
        files = sorted(((f.stat(), f) for f in self.folder.iterdir() if f.is_file()), key=lambda s: -s[0].st_mtime)
        sizes = np.cumsum([st.st_size for st, _ in files])
        for (_, f), total in zip(files, sizes):
            if total > self.limit:
                f.unlink(missing_ok=True)


@functools.cache
def _codecs_source() -> bytes:
    """Part of every cache key: a change to a codec's settings makes new chunks."""
    return hashlib.sha256(Path(codecs.__file__).read_bytes()).digest()


def _compress_all(jobs: list[tuple[str, bytes]], cache: ChunkCache | None = None) -> list[bytes]:
    """(codec, data) jobs, compressed in parallel; those `cache` holds are taken from it."""
    keys = [cache.key(*j) for j in jobs] if cache else []
    out = [cache.get(k) for k in keys] if cache else [None] * len(jobs)
    todo = [i for i, o in enumerate(out) if o is None]
    made = _in_parallel(lambda j: codecs.compress(*j), [jobs[i] for i in todo], [len(jobs[i][1]) for i in todo])
    for i, data in zip(todo, made):
        out[i] = data
    if cache and todo:
        cache.put({keys[i]: out[i] for i in todo})
    return out


def _chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def _allowed(value: str, registry: Registry, key: str) -> list[str]:
    if value == "auto":
        return list(registry)
    registry.lookup(value, key)
    return [value]


def trial_pair(key: str) -> tuple[str, str]:
    """(codec, layout) of a plan's trial key `codec_layout` (codec names may hold underscores, layouts do not)."""
    codec, layout = key.rsplit("_", 1)
    return codec, layout


def _choose(trials: dict[str, int], slack: int) -> tuple[str, str, int]:
    """(codec, layout, estimate): of the pairs within `slack` bytes of the smallest, the fastest to decode."""
    best = min(trials.values())
    near = [(*trial_pair(key), size) for key, size in trials.items() if size <= best + slack]
    return min(near, key=lambda t: (codecs.CODECS[t[0]].decode_s_per_mib, t[2]))


def plan_streams(result: QuantResult, codec: str = "auto", layout: str = "auto",
                 names: set[str] | None = None, slack: int = 0, streams: str = "group") -> dict[str, dict]:
    """Per stream (or those in `names`), the (layout, codec) pair that compresses a sample of it smallest, and each
    tried pair's size extrapolated from the sample. Every codec is tried on the first allowed layout, then the
    chosen one on the others: a layout changes how a codec sees the codes, not which codec models them best, and
    the trials of the slowest codecs are the plan's time. A pair within `slack` bytes of the smallest that decodes
    faster is taken instead (ZPAQ's level 5 takes seconds a MiB, both ways, for a fraction of a percent). `streams`
    is compress.streams: how tensors' codes are grouped into streams."""
    planned = {n: s for n, s in _streams(result, streams)[0].items() if names is None or n in names}
    codec_names = _allowed(codec, codecs.CODECS, "compress.codec")
    layout_names = _allowed(layout, LAYOUTS, "compress.layout")
    plan: dict[str, dict] = {}

    def trial(pairs: list[tuple[_Stream, str, list[str]]]) -> None:  # (stream, layout, codecs)
        jobs = []  # (stream, layout, codec, raw size, sample)
        for s, lay, tried in pairs:
            raw, _ = s.build(layouts.layout(lay))
            jobs += [(s.name, lay, c, len(raw), _sample(raw)) for c in tried]
        for (name, lay, c, n, sample), packed in zip(jobs, _compress_all([(c, x) for _, _, c, _, x in jobs])):
            plan.setdefault(name, {"trials": {}})["trials"][f"{c}_{lay}"] = round(len(packed) * n / max(len(sample), 1))
        for entry in plan.values():
            entry["codec"], entry["layout"], entry["estimate"] = _choose(entry["trials"], slack)

    allowed = {n: layout_names if s.codes else ["raw"] for n, s in planned.items()}
    trial([(s, allowed[n][0], codec_names) for n, s in planned.items()])
    trial([(s, lay, [plan[n]["codec"]]) for n, s in planned.items() for lay in allowed[n][1:]])
    return plan


def plan_for(result: QuantResult, cfg: CompressConfig, names: set[str] | None = None) -> dict[str, dict]:
    """plan_streams with the compress section's codec, layout, slack and streams."""
    return plan_streams(result, cfg.codec, cfg.layout, names, cfg.auto_slack_bytes, cfg.streams)


def _layouts(result: QuantResult, plan: dict[str, dict], grouping: str) -> tuple[list[str], dict, list[dict]]:
    """The streams in order, each one's bytes in its planned layout, and the tensor entries pointing into them."""
    streams, entries = _streams(result, grouping)
    if set(streams) - set(plan):
        raise PgolfError(f"no codec plan for stream(s) {sorted(set(streams) - set(plan))}")
    raws, spans = {}, {}
    for name, s in streams.items():
        raws[name], spans[name] = s.build(layouts.layout(plan[name]["layout"]))
    order = sorted(streams)

    def ref(part):  # (stream, part index) -> [stream index, offset, length]
        name, i = part
        return [order.index(name), *spans[name][i]]

    for e in entries:
        for key in ("codes", "scale", "data"):
            if key in e:
                e[key] = ref(e[key])
        if "lqer" in e:
            e["lqer"] = {k: ref(v) if isinstance(v, tuple) else v for k, v in e["lqer"].items()}
    return order, raws, entries


def _header(meta: dict, plan: dict, order: list[str], raws: dict, packed: list[list[int]], entries: list[dict]) -> bytes:
    return json.dumps({"meta": meta, "chunk": CHUNK,
                       "streams": [[n, plan[n]["layout"], codecs.CODECS[plan[n]["codec"]].id, len(raws[n]), p]
                                   for n, p in zip(order, packed)],
                       "tensors": entries}, sort_keys=True, separators=(",", ":")).encode()


def _pack_header(header: bytes) -> bytes:
    return lzma.compress(header, preset=9 | lzma.PRESET_EXTREME)


def pack(result: QuantResult, meta: dict, plan: dict[str, dict], cache: ChunkCache | None = None,
         streams: str = "group") -> tuple[bytes, dict[str, dict]]:
    """The blob for `result`, its codes in the streams `streams` (compress.streams) makes, each with the layout and
    codec `plan` names; also a report per stream (raw, order-0 entropy and packed bytes)."""
    order, raws, entries = _layouts(result, plan, streams)
    jobs = [(n, plan[n]["codec"], c) for n in order for c in _chunks(raws[n])]
    packed_chunks = _compress_all([(codec, c) for _, codec, c in jobs], cache)
    packed = {n: [p for (m, _, _), p in zip(jobs, packed_chunks) if m == n] for n in order}
    header = _header(meta, plan, order, raws, [[len(p) for p in packed[n]] for n in order], entries)
    digest = hashlib.sha256(header + b"".join(raws[n] for n in order)).digest()
    packed_header = _pack_header(header)
    blob = HEAD.pack(MAGIC, VERSION, digest, len(packed_header), len(header)) + packed_header + b"".join(packed_chunks)
    report = {n: {"layout": plan[n]["layout"], "codec": plan[n]["codec"], "raw": len(raws[n]),
                  "entropy": round(codecs.entropy_bytes(raws[n])), "packed": sum(map(len, packed[n]))} for n in order}
    return blob, report


def header_bytes(result: QuantResult, meta: dict, plan: dict[str, dict], streams: str = "group") -> int:
    """What the blob's fixed head and packed header take, with the plan's estimates as the streams' sizes."""
    order, raws, entries = _layouts(result, plan, streams)
    estimates = [[round(plan[n]["estimate"] * len(c) / len(raws[n])) for c in _chunks(raws[n])] for n in order]
    return HEAD.size + len(_pack_header(_header(meta, plan, order, raws, estimates, entries)))


# ----------------------------------------------------------------------------- reading

def unpack(blob: bytes, where: str = "blob") -> tuple[dict[str, torch.Tensor], dict]:
    """Blob -> dequantized fp32 state dict and meta; the only way eval reads a model. Every size the blob
    declares is checked against the bytes present before anything is allocated for it."""
    if len(blob) < HEAD.size or blob[:len(MAGIC)] != MAGIC:
        raise PgolfError(f"{where}: not a pgolf model blob (bad magic)")
    magic, version, digest, hpacked, hlen = HEAD.unpack_from(blob)
    if version != VERSION:
        raise PgolfError(f"{where}: blob format version {version}, expected {VERSION} (rerun compress)")
    if hlen > MAX_HEADER or HEAD.size + hpacked > len(blob):
        raise PgolfError(f"{where}: corrupted or truncated blob (header sizes out of range)")
    try:
        header_raw = codecs.decompress(codecs.CODECS["lzma"].id, blob[HEAD.size:HEAD.size + hpacked], hlen, where)
        header = json.loads(header_raw)
        chunk = int(header["chunk"])
        streams = [(str(n), str(lay), int(c), int(raw), [int(x) for x in p]) for n, lay, c, raw, p in header["streams"]]
    except (ValueError, KeyError, TypeError) as e:
        raise PgolfError(f"{where}: malformed blob header ({type(e).__name__})") from None
    if sum(s[3] for s in streams) > MAX_RAW:
        raise PgolfError(f"{where}: declares {sum(s[3] for s in streams):,} raw bytes, more than a blob may hold ({MAX_RAW:,})")
    if chunk < MIN_CHUNK or any(raw < 0 or len(p) != -(-raw // chunk) or min(p, default=0) < 0 for _, _, _, raw, p in streams):
        raise PgolfError(f"{where}: malformed blob header (chunk sizes do not match the streams)")
    if HEAD.size + hpacked + sum(sum(s[4]) for s in streams) != len(blob):
        raise PgolfError(f"{where}: corrupted or truncated blob (stream sizes do not add up to its {len(blob):,} bytes)")
    jobs, off = [], HEAD.size + hpacked  # (stream, codec id, packed chunk, its raw bytes)
    for i, (_, _, codec_id, raw, packed) in enumerate(streams):
        for j, n in enumerate(packed):
            jobs.append((i, codec_id, blob[off:off + n], min(chunk, raw - j * chunk)))
            off += n
    chunks = _in_parallel(lambda j: codecs.decompress(j[1], j[2], j[3], where), jobs, [j[3] for j in jobs])
    raws = [b"".join(c for (i, *_), c in zip(jobs, chunks) if i == k) for k in range(len(streams))]
    if hashlib.sha256(header_raw + b"".join(raws)).digest() != digest:
        raise PgolfError(f"{where}: corrupted blob (payload sha256 mismatch)")
    try:
        return _tensors(header["tensors"], streams, raws, where), header["meta"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise PgolfError(f"{where}: malformed blob header ({type(e).__name__})") from None


def load_model(path: Path, device: torch.device | str = "cpu", expected_sha256: str | None = None):
    """The GPT a blob holds, after checking it is the blob compress recorded."""
    blob = path.read_bytes() if path.is_file() else b""
    if not blob:
        raise PgolfError(f"{path}: missing or empty (run the compress stage)")
    if expected_sha256 is not None:
        actual = hashlib.sha256(blob).hexdigest()
        if actual != expected_sha256:
            raise PgolfError(f"{path}: sha256 {actual[:12]}... differs from {expected_sha256[:12]}... recorded by compress")
    state, meta = unpack(blob, str(path))
    return build_model(meta, state, device, str(path))


def _part(ref: list, streams: list, raws: list[bytes], shape: tuple[int, ...], bits: int, where: str,
          layout: str | None = None) -> torch.Tensor:
    """The values of `shape` a part holds, after checking its span lies in its stream and fits the shape."""
    i, off, n = (int(x) for x in ref)
    lay = layouts.layout(layout or streams[i][1])
    if not (0 <= off and off + n <= len(raws[i])) or n != lay.size(shape, bits):
        raise PgolfError(f"{where}: malformed blob (a tensor part does not match its declared shape)")
    try:
        values = lay.unpack(raws[i][off:off + n], bits, shape)
    except ValueError as e:
        raise PgolfError(f"{where}: malformed blob ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(values).copy())


def _shape(shape: list, where: str) -> tuple[int, ...]:
    if not all(isinstance(d, int) and 0 <= d < 1 << 31 for d in shape):
        raise PgolfError(f"{where}: malformed blob (bad tensor shape {shape})")
    return tuple(shape)


def _halves(ref: list, streams, raws, count: int, where: str) -> torch.Tensor:
    data = _part(ref, streams, raws, (2 * count,), 0, where, "raw")
    return torch.from_numpy(unshuffle16(data.numpy().tobytes()).copy())


def _tensors(entries: list[dict], streams: list, raws: list[bytes], where: str) -> dict[str, torch.Tensor]:
    state = {}
    for e in entries:
        shape = _shape(e["shape"], where)
        if e["kind"] == "int":
            rows = shape[0]
            codes = _part(e["codes"], streams, raws, shape, e["bits"], where)
            q = Quantized(codes, _halves(e["scale"], streams, raws, rows, where), e["bits"])
            if "lqer" in e:
                lq, r = e["lqer"], int(e["lqer"]["rank"])
                b_shape = _shape([r, shape[1]], where)
                q.lqer = LowRank(_part(lq["a"], streams, raws, (rows, r), 2, where),
                                 _halves(lq["a_scale"], streams, raws, 1, where),
                                 _part(lq["b"], streams, raws, b_shape, 4, where),
                                 _halves(lq["b_scale"], streams, raws, layouts.count(b_shape) // int(lq["group"]), where))
            state[e["name"]] = q.dequantize()
        else:
            state[e["name"]] = _halves(e["data"], streams, raws, layouts.count(shape), where).float().reshape(shape)
    return state


# ----------------------------------------------------------------------------- sizing for quantize

class Sizer:
    """The compressed size of a QuantResult: exact (the blob compress will write, with a codec plan made on the
    first call), or estimated from the order-0 entropy of each group's codes, scaled by the packed/entropy
    ratio measured at the last calibration."""

    def __init__(self, meta: dict, cfg: CompressConfig, cache: ChunkCache | None = None):
        self.meta, self.cfg, self.cache = meta, cfg, cache
        self.plan: dict | None = None
        self.report: dict = {}
        self.seconds = {"plan": 0.0, "pack": 0.0}  # where the exact sizes' time went
        self.ratio: dict[str, float] = {}
        self.fixed = 0.0  # bytes the estimate holds constant: header, fp16 and LQER streams

    def exact(self, result: QuantResult) -> int:
        t0 = time.perf_counter()
        if self.plan is None:
            self.plan = plan_for(result, self.cfg)
        missing = set(_streams(result, self.cfg.streams)[0]) - set(self.plan)  # LQER's: once factors are added
        if missing:
            self.plan |= plan_for(result, self.cfg, missing)
        t1 = time.perf_counter()
        blob, self.report = pack(result, self.meta, self.plan, self.cache, self.cfg.streams)
        self.seconds["plan"] += t1 - t0
        self.seconds["pack"] += time.perf_counter() - t1
        return len(blob)

    def prepare(self, result: QuantResult) -> None:
        """Make the codec plan and a first calibration from its sample trials (no whole blob compressed)."""
        t0 = time.perf_counter()
        self.plan = plan_for(result, self.cfg)
        self.seconds["plan"] += time.perf_counter() - t0
        entropy = code_entropy(result, self.cfg.streams)
        self.ratio = {s: self.plan[s]["estimate"] / max(h, 1e-9) for s, h in entropy.items()}
        self.fixed = header_bytes(result, self.meta, self.plan, self.cfg.streams) + sum(
            e["estimate"] for n, e in self.plan.items() if not n.startswith("codes."))

    def calibrate(self, result: QuantResult, size: int) -> None:
        """Measure the ratios at `result`, whose exact size was the last one computed."""
        entropy = code_entropy(result, self.cfg.streams)
        self.ratio = {s: self.report[s]["packed"] / max(h, 1e-9) for s, h in entropy.items()}
        self.fixed = size - sum(self.report[s]["packed"] for s in entropy)

    def estimate(self, result: QuantResult) -> float:
        return self.fixed + sum(self.ratio[s] * h for s, h in code_entropy(result, self.cfg.streams).items())


def code_entropy(result: QuantResult, streams: str = "group") -> dict[str, float]:
    """Order-0 entropy in bytes of each code stream's codes (histograms on the codes' device)."""
    hist: dict[str, torch.Tensor] = {}
    for name, q in result.quantized.items():
        h = torch.bincount(q.codes.reshape(-1).int() + 128, minlength=256).double()
        g = code_stream(name, streams)
        hist[g] = hist[g] + h if g in hist else h
    out = {}
    for g, h in hist.items():
        n = h.sum()
        p = h[h > 0] / n
        out[g] = float(-(p * p.log2()).sum() * n / 8)
    return out
