"""Each codec on the whole of each stream of quantized models, for each codes layout and stream grouping, cut into the
blob's chunks and compressed on all cores as pack does: bytes against the order-0 entropy, and the seconds to compress
and to decompress. The plan's sample trials decide the blob; this says what each choice does on all of it.

    python bench/codec_table.py [--quantized=A.safetensors,B.safetensors] [--layouts=int8,col]
                                [--streams=group,type] [--slack=4096] [--out=PATH] zpaq zpaq_o1 brotli auto

Several quantized files compare what was done before the codes (compress.reorder: quantize once with none and once
with similar; the file's name labels its rows; bench/quantize_checkpoint.py writes both from a trained checkpoint).
The codec `auto` is compress's own choice: the plan's sample trials pick each stream's pair among the --layouts given
(`auto`: all of them; `int8`: row-major only), at --slack (default 4096, the presets'), and the blob is packed and
unpacked whole.
"""

import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))
from points import print_table, save  # noqa: E402

from pgolf import codecs, layouts, pack, quant  # noqa: E402


def measure(result: quant.QuantResult, codec: str, layout: str, grouping: str) -> dict:
    streams, _ = pack._streams(result, grouping)
    raws = {n: s.build(layouts.layout(layout if s.codes else "raw"))[0] for n, s in streams.items()}
    chunks = {n: pack._chunks(raw) for n, raw in raws.items()}
    jobs = [(codec, c) for cs in chunks.values() for c in cs]
    t0 = time.perf_counter()
    packed = pack._compress_all(jobs)
    t1 = time.perf_counter()
    pack._in_parallel(lambda j: codecs.decompress(codecs.CODECS[codec].id, j[0], j[1], codec),
                      [(p, len(c)) for p, (_, c) in zip(packed, jobs)], [len(c) for _, c in jobs])
    t2 = time.perf_counter()
    sizes, i = {}, 0
    for n, cs in chunks.items():
        sizes[n], i = sum(map(len, packed[i:i + len(cs)])), i + len(cs)
    codes = sum(v for n, v in sizes.items() if n.startswith("codes."))
    entropy = sum(codecs.entropy_bytes(raws[n]) for n in raws if n.startswith("codes."))
    return {"codec": codec, "layout": layout, "streams": grouping, "codes_bytes": codes,
            "codes_entropy_bytes": round(entropy), "vs_order0": round(codes / entropy - 1, 5),
            "total_bytes": sum(sizes.values()), "compress_s": round(t1 - t0, 2), "decompress_s": round(t2 - t1, 2),
            "stream_bytes": sizes}


def measure_auto(result: quant.QuantResult, meta: dict, layout: str, grouping: str, slack: int) -> dict:
    """What compress does with codec auto: the plan's sample trials pick each stream's (layout, codec) from `layout`
    (auto: every layout), then the whole blob is packed and unpacked."""
    t0 = time.perf_counter()
    plan = pack.plan_streams(result, "auto", layout, slack=slack, streams=grouping)
    blob, report = pack.pack(result, meta, plan, streams=grouping)
    t1 = time.perf_counter()
    pack.unpack(blob)
    t2 = time.perf_counter()
    codes = {n: r for n, r in report.items() if n.startswith("codes.")}
    packed, entropy = sum(r["packed"] for r in codes.values()), sum(r["entropy"] for r in codes.values())
    return {"codec": "auto", "layout": layout, "streams": grouping, "codes_bytes": packed,
            "codes_entropy_bytes": entropy, "vs_order0": round(packed / entropy - 1, 5), "total_bytes": len(blob),
            "compress_s": round(t1 - t0, 2), "decompress_s": round(t2 - t1, 2),
            "picked": {n: f"{r['codec']} {r['layout']}" for n, r in codes.items()}}


def main() -> None:
    options = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or ["zpaq", "zpaq_o1", "brotli"]
    files = options.get("quantized", "artifacts/quantize/quantized.safetensors").split(",")
    layouts, groupings = options.get("layouts", "int8,col").split(","), options.get("streams", "group,type").split(",")
    out = Path(options.get("out", "bench/results/codec_table.json"))
    rows = []
    for file in files:
        result, meta = quant.load_quantized(file)
        for codec, layout, grouping in itertools.product(names, layouts, groupings):
            if layout == "auto" and codec != "auto":  # a choice among layouts: the planner's
                continue
            row = (measure_auto(result, meta, layout, grouping, int(options.get("slack", 4096))) if codec == "auto"
                   else measure(result, codec, layout, grouping))
            rows.append({"model": Path(file).stem, **row})
            print(json.dumps(rows[-1]), flush=True)
            save(out, {"cores": os.cpu_count()}, rows)
    print_table(rows, {"model": "{model}", "codec": "{codec}", "layout": "{layout}", "streams": "{streams}",
                       "codes bytes": "{codes_bytes:,}", "vs order-0": "{vs_order0:+.3%}",
                       "all streams": "{total_bytes:,}", "compress s": "{compress_s}",
                       "decompress s": "{decompress_s}"})


if __name__ == "__main__":
    main()
