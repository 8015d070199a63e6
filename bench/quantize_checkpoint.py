"""A trained checkpoint (bench/record_parity.py --save) quantized as the preset's quantize stage does, once per
compress.reorder, at the preset's clip (no byte target: the codes of every file share one clip), for
bench/codec_table.py to compare layouts and codecs on real codes.

    python bench/quantize_checkpoint.py --checkpoint CKPT --mirror DIR [--preset presets/record.yaml]
                                        [--reorder none similar] [--out-dir DIR]

Writes <out-dir>/<preset>_<reorder>.safetensors (the quantize stage's format) and prints calibration and quantize
seconds.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgolf import calibrate, pack, quant, reorder, runtime, weights  # noqa: E402
from pgolf.config import load_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--mirror", type=Path, required=True, help="the mirror the checkpoint was trained on")
    ap.add_argument("--preset", type=Path, default=ROOT / "presets" / "record.yaml")
    ap.add_argument("--reorder", nargs="+", default=["none", "similar"], choices=list(reorder.REORDERS))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    params = load_params(args.preset)
    rt = runtime.init()
    ckpt = torch.load(args.checkpoint, map_location="cpu")
    meta = weights.model_meta(params.model, ckpt["passes"])
    model = weights.build_model(meta, ckpt["state"], rt.device, str(args.checkpoint))
    data = next(p for p in (args.mirror / "datasets" / "datasets").iterdir() if p.is_dir())
    c = calibrate.calibrate(model, params.calibrate, data, rt.device)
    print(f"calibrate: {c.tokens:,} tokens in {c.seconds:.1f} s", flush=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.reorder:
        t0 = time.perf_counter()
        s, h = reorder.REORDERS[name](dict(state), dict(c.hessians), c.shared, params.model)
        result, _ = quant.quantize(s, h, c.shared, params.quant, None, pack.Sizer(meta, params.compress))
        path = args.out_dir / f"{args.preset.stem}_{name}.safetensors"
        quant.save_quantized(path, result, meta)
        print(f"reorder {name}: quantized in {time.perf_counter() - t0:.1f} s -> {path} "
              f"({path.stat().st_size:,} bytes)", flush=True)


if __name__ == "__main__":
    main()
