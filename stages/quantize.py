"""quantize: picked weights + Hessians -> artifacts/quantize/quantized.safetensors, fitted to the byte budget."""

import torch

from pgolf import export, pack, paths, quant, reorder, stage
from pgolf.config import load_params


def main() -> dict:
    params = load_params()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, hessians, shared, model_meta = quant.load_inputs(device)
    state, hessians = reorder.REORDERS[params.compress.reorder](state, hessians, shared, params.model)
    budget = export.model_budget(params)
    sizer = pack.Sizer(model_meta, params.compress, pack.ChunkCache(paths.PACK_CACHE))
    result, metrics = quant.quantize(state, hessians, shared, params.quant, budget, sizer,
                                    log=lambda line: print(line, flush=True))
    quant.save_quantized(paths.QUANTIZED, result, model_meta | {"plan": sizer.plan})
    return metrics | {f"codec_{k}_seconds": round(v, 3) for k, v in sizer.seconds.items()}


if __name__ == "__main__":
    stage.run(main, "quantize")
