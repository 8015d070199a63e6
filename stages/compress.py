"""compress: quantized tensors -> artifacts/compress/model.blob (the model bytes that count)."""

import hashlib
import time

from pgolf import pack, paths, quant, stage
from pgolf.config import load_params
from pgolf.io import write_bytes, write_json


def main() -> dict:
    cfg = load_params().compress
    result, meta = quant.load_quantized(paths.QUANTIZED)
    t0 = time.perf_counter()
    # quantize's plan, where it sized the blob with one (its trials ran on the same tensors at the configured clip)
    plan = meta.pop("plan", None) or pack.plan_for(result, cfg)
    blob, report = pack.pack(result, meta, plan, pack.ChunkCache(paths.PACK_CACHE), cfg.streams)
    seconds = time.perf_counter() - t0
    write_bytes(paths.BLOB, blob)
    write_json(paths.BLOB_INFO, {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "streams": report,
                                 "plan": plan})
    codes = {n: e for n, e in plan.items() if n.startswith("codes.")}
    estimates: dict[str, int] = {}  # each codec's size on the code streams, with its better layout
    for entry in codes.values():
        best: dict[str, int] = {}
        for trial, size in entry["trials"].items():
            codec, _ = pack.trial_pair(trial)
            best[codec] = min(best.get(codec, size), size)
        for codec, size in best.items():
            estimates[codec] = estimates.get(codec, 0) + size
    return {"blob_bytes": len(blob), "seconds": round(seconds, 3),
            "codes_bytes": sum(report[n]["packed"] for n in codes),
            "codes_entropy_bytes": round(sum(pack.code_entropy(result, cfg.streams).values())),
            **{f"codes_bytes_est_{c}": v for c, v in sorted(estimates.items())}}


if __name__ == "__main__":
    stage.run(main, "compress")
