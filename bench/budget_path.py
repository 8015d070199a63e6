"""The quant-only path at a preset's full model size, without training: fit to the byte target, pack (compress),
unpack (what eval does first). Counts what the fit spends (quantizations, codec checks) and times each step.

The weights are the preset's initialization with heavy-tailed rows (Student-t, 4 degrees of freedom, row scales
spread over 4x) and the Hessians come from the real calibration code on random tokens: a stand-in for a trained
checkpoint, good for timing and for the search's behaviour, not for bpb. Runs on a CPU (minutes: GPTQ's column loop)
or a GPU. Prints a table, writes bench/results/budget_path.json (or --out=PATH).
    python bench/budget_path.py [--preset=presets/challenge.yaml] [--target=BYTES] [--out=PATH] \
        gptq_sd:method=gptq,clip_rule=sdclip gptq_cs:method=gptq,clip_rule=clip_search
"""

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from points import parse_args, print_table, save  # noqa: E402

from pgolf import export, pack, quant  # noqa: E402
from pgolf.calibrate import collect_hessians  # noqa: E402
from pgolf.config import load_params  # noqa: E402
from pgolf.model import GPT  # noqa: E402
from pgolf.weights import model_meta  # noqa: E402

CALIBRATION_SEQS, CALIBRATION_LEN = 8, 512


def stand_in_state(model: GPT, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's weights with each large matrix redrawn as heavy-tailed rows at the init's scale."""
    g = torch.Generator().manual_seed(seed)
    state = {n: t.detach().float().clone() for n, t in model.state_dict().items()}
    for n, t in state.items():
        if t.ndim == 2 and t.numel() >= 65536:
            t_rows = torch.distributions.StudentT(4.0).sample(t.shape) / 2 ** 0.5  # unit variance
            spread = 2.0 ** (2 * torch.rand(t.size(0), 1, generator=g) - 1)
            state[n] = t_rows * spread * t.std().clamp_min(1e-3)
    return state


def main() -> None:
    options, points = parse_args(sys.argv[1:] or ["gptq_sd:method=gptq,clip_rule=sdclip"])
    params = load_params(options.get("preset", "presets/challenge.yaml"))
    out = Path(options.get("out", "bench/results/budget_path.json"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPT(params.model)
    state = stand_in_state(model)
    model.load_state_dict(state, strict=False)
    model.to(device).eval()
    tokens = torch.randint(0, params.model.vocab_size, (CALIBRATION_SEQS, CALIBRATION_LEN), device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        hessians, shared, _ = collect_hessians(model, iter(tokens.split(2)))
    calibrate_s = time.perf_counter() - t0
    state = {n: t.to(device) for n, t in state.items()}
    meta = model_meta(params.model, model.max_passes)
    target = int(options["target"]) if "target" in options else export.model_budget(params)
    params_n = sum(t.numel() for t in state.values())
    print(f"{params_n / 1e6:.1f} M parameters on {device} ({os.cpu_count()} cores), target {target:,} bytes, "
          f"calibration {calibrate_s:.1f} s", flush=True)
    rows = []
    for name, values in points:
        cfg = dataclasses.replace(params.quant, **values)
        problem = quant.Problem(state, hessians, shared, cfg)
        offsets: list[float] = []  # every quantization the fit asks for

        def codes(offset: float, quantize=problem.codes) -> quant.QuantResult:
            offsets.append(offset)
            return quantize(offset)

        problem.codes = codes
        with tempfile.TemporaryDirectory() as folder:  # one chunk cache, as the quantize and compress stages share
            cache = pack.ChunkCache(Path(folder))
            sizer = pack.Sizer(meta, params.compress, cache)
            t0 = time.perf_counter()
            result, info = quant.fit_target(problem, target, sizer)
            t1 = time.perf_counter()
            blob, report = pack.pack(result, meta, sizer.plan, cache, params.compress.streams)
            t2 = time.perf_counter()
        pack.unpack(blob)
        t3 = time.perf_counter()
        rows.append({"point": name, **values, "model_bytes": len(blob), "clip_offset": info["clip_offset"],
                     "pruned": info["pruned_codes"], "quantizations": len(offsets), "codec_checks": info["codec_checks"],
                     "fit_s": round(t1 - t0, 1), "search_s": info.get("search_seconds"),
                     "codec_plan_s": round(sizer.seconds["plan"], 1), "codec_pack_s": round(sizer.seconds["pack"], 1),
                     "compress_s": round(t2 - t1, 1), "unpack_s": round(t3 - t2, 1),
                     "codecs": {n: r["codec"] for n, r in report.items()}, "offsets": [round(o, 4) for o in offsets]})
        print(json.dumps(rows[-1]), flush=True)
        save(out, {"device": str(device), "cores": os.cpu_count(), "parameters": params_n, "target": target}, rows)
    print_table(rows, {"point": "{point}", "model bytes": "{model_bytes:,}", "clip offset": "{clip_offset}",
                       "quantizations": "{quantizations}", "codec checks": "{codec_checks}", "fit s": "{fit_s}",
                       "compress s": "{compress_s}", "unpack s": "{unpack_s}"})

if __name__ == "__main__":
    main()
