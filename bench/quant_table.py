"""Quantizers on one checkpoint, all at one byte target, in one process: bytes, bpb, quant gap, seconds.

Reads the artifacts a `dvc repro` left (picked weights, Hessians, the tokenized val split, params.yaml) and, per
point, fits the model to the target exactly as the quantize stage does, packs the blob as compress does and
scores the weights it holds as eval does. Those weights are taken from the quantized result, not decoded from the
blob: the tests check that unpacking gives them bit for bit, and ZPAQ's decode takes seconds. Sliding windows at
eval.stride: test-time training, if the preset has it, is left out to compare the quantizers alone; `--eval=plain`
scores only the non-overlapping windows the quant gap uses, which is much faster. Prints a table, writes
bench/results/quant_table.json (or --out=PATH).
    python bench/quant_table.py [--target=BYTES] [--eval=plain] gptq_cs:method=gptq,clip_rule=clip_search \
        adaptive_lqer:method=adaptive_clip,lqer_rank=4
(default target: quant.target_bytes resolved as the quantize stage does)
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from points import parse_args, print_table, save  # noqa: E402

from pgolf import evaluate, export, pack, paths, quant  # noqa: E402
from pgolf.config import load_params  # noqa: E402
from pgolf.data import load_val  # noqa: E402
from pgolf.io import read_json  # noqa: E402
from pgolf.weights import build_model  # noqa: E402


def main() -> None:
    params = load_params()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, hessians, shared, model_meta = quant.load_inputs(device)
    options, points = parse_args(sys.argv[1:])
    target = int(options["target"]) if "target" in options else export.model_budget(params)
    plain_only = options.get("eval", "sliding") == "plain"
    windows = "plain" if plain_only else "sliding"
    out = Path(options.get("out", "bench/results/quant_table.json"))
    val = load_val(paths.TOKENIZED, model_meta["config"]["vocab_size"])
    prequant = read_json(paths.metrics("ema"))["prequant_val_bpb"]
    sliding = dataclasses.replace(params.eval, mode="sliding")
    plain = dataclasses.replace(params.eval, mode="sliding", stride=0, seq_len=params.ema.eval_seq_len)
    rows = []
    for name, sets in points:
        cfg = dataclasses.replace(params.quant, **sets)
        t0 = time.perf_counter()
        sizer = pack.Sizer(model_meta, params.compress, pack.ChunkCache(paths.PACK_CACHE))
        result, metrics = quant.quantize(state, hessians, shared, cfg, target, sizer)
        t1 = time.perf_counter()
        blob, _ = pack.pack(result, model_meta, sizer.plan or pack.plan_for(result, params.compress), sizer.cache,
                            params.compress.streams)
        t2 = time.perf_counter()
        model = build_model(model_meta, result.dequantized(), device, name)
        p = evaluate.evaluate(model, val, plain, device)[0]
        same = plain_only or evaluate.like_for_like(sliding, plain.seq_len)
        s = p if same else evaluate.evaluate(model, val, sliding, device)[0]
        t3 = time.perf_counter()
        rows.append({"point": name, **sets, "model_bytes": len(blob), "val_bpb": round(s.bpb, 6),
                     "quant_gap": round(p.bpb - prequant, 6), "quantize_s": round(t1 - t0, 1), "pack_s": round(t2 - t1, 1),
                     "eval_s": round(t3 - t2, 1), "clip_offset": metrics["clip_offset"],
                     "pruned": metrics["pruned_codes"], "lqer_tensors": metrics["lqer_tensors"],
                     "codec_checks": metrics["codec_checks"], "search_s": metrics.get("search_seconds")})
        print(json.dumps(rows[-1]), flush=True)
        save(out, {"target": target, "prequant": prequant, "eval": windows}, rows)
    print(f"\ntarget {target:,} model bytes; prequant val_bpb {prequant}; val_bpb on {windows} windows")
    print_table(rows, {"point": "{point}", "model bytes": "{model_bytes:,}", "val_bpb": "{val_bpb:.5f}",
                       "quant gap": "{quant_gap:+.5f}", "clip offset": "{clip_offset}", "pruned": "{pruned}",
                       "quantize s": "{quantize_s}", "pack s": "{pack_s}", "eval s": "{eval_s}"})

if __name__ == "__main__":
    main()
