"""quantize: EMA weights + Hessians -> artifacts/quantize/quantized.safetensors (int codes, fp16 scales)."""

import time

import torch

from pgolf import pack, stage
from pgolf.checkpoint import load_tensors, save_tensors
from pgolf.config import load_params
from pgolf.quant import GROUPS, QuantResult, apply_pruning, prune_candidates, quantize_state, search_target
from stages.calibrate import OUT as HESSIANS
from stages.ema import OUT as EMA_MODEL

OUT = stage.ARTIFACTS / "quantize" / "quantized.safetensors"


def save_result(result: QuantResult, meta: dict) -> None:
    tensors = {}
    for name, q in result.quantized.items():
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = q.codes, q.scale
    tensors |= {f"{name}.fp16": t for name, t in result.floats.items()}
    bits = {name: q.bits for name, q in result.quantized.items()}
    save_tensors(OUT, tensors, {**meta, "bits": bits})


def main() -> dict:
    params = load_params()
    cfg, ccfg = params.quant, params.compress
    state, meta = load_tensors(EMA_MODEL)
    hessians, hmeta = load_tensors(HESSIANS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = {k: v.to(device) for k, v in state.items()}
    hessians = {k: v.to(device) for k, v in hessians.items()}
    shared = hmeta.get("shared", {})
    model_meta = {"config": meta["config"]}
    t0 = time.perf_counter()
    result = quantize_state(state, hessians, shared, cfg)
    extra: dict = {}
    if cfg.target_bytes is not None and (cfg.prune or cfg.method == "adaptive_clip"):
        _, sizes = pack.pack(result, model_meta, ccfg.codec, ccfg.layout)
        codec, layout = min(sizes, key=sizes.get).split("_")  # search with the best combination found here
        size_of_result = lambda r: len(pack.pack(r, model_meta, codec, layout)[0])  # noqa: E731
        if cfg.method == "adaptive_clip":
            offset, size = search_target(lambda x: size_of_result(quantize_state(state, hessians, shared, cfg, x)),
                                         -1.0, 20.0, cfg.target_bytes, False, "adaptive_clip's clip offset")
            result = quantize_state(state, hessians, shared, cfg, offset)
            extra |= {"clip_offset": round(offset, 4), "searched_bytes": size}
        if cfg.prune:
            candidates, names = prune_candidates(result, hessians, shared)
            n, size = search_target(lambda n: size_of_result(apply_pruning(result, candidates, names, int(n))),
                                    0, candidates.size(1), cfg.target_bytes, True, "pruning every ±1 code")
            result = apply_pruning(result, candidates, names, int(n))
            extra |= {"pruned_codes": int(n), "prune_candidates": int(candidates.size(1)), "searched_bytes": size}
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    save_result(result, model_meta)
    metrics = {"method": cfg.method, "seconds": round(seconds, 3), **extra}
    total_err = total_norm = 0.0
    for g in GROUPS:
        errs = [e for e in result.errors.values() if e["group"] == g]
        if errs:
            err, norm = sum(e["error"] for e in errs), sum(e["norm"] for e in errs)
            metrics[f"rel_error_{g}"] = round(err / max(norm, 1e-30), 8)
            total_err, total_norm = total_err + err, total_norm + norm
    metrics["rel_error_total"] = round(total_err / max(total_norm, 1e-30), 8)
    return metrics


if __name__ == "__main__":
    stage.run(main, "quantize")
