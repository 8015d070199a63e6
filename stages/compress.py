"""compress: quantized tensors -> artifacts/compress/model.blob (the model bytes that count)."""

import hashlib

import torch

from pgolf import pack, stage
from pgolf.checkpoint import load_tensors
from pgolf.config import load_params
from pgolf.io import write_bytes
from pgolf.quant import QuantResult, Quantized
from stages.quantize import OUT as QUANTIZED

OUT = stage.ARTIFACTS / "compress" / "model.blob"


def load_result(tensors: dict[str, torch.Tensor], meta: dict) -> QuantResult:
    quantized = {name: Quantized(tensors[f"{name}.codes"], tensors[f"{name}.scale"], bits)
                 for name, bits in meta["bits"].items()}
    floats = {k.removesuffix(".fp16"): v for k, v in tensors.items() if k.endswith(".fp16")}
    return QuantResult(quantized, floats, {})


def main() -> dict:
    cfg = load_params().compress
    tensors, meta = load_tensors(QUANTIZED)
    blob, sizes = pack.pack(load_result(tensors, meta), {"config": meta["config"]}, cfg.codec, cfg.layout)
    write_bytes(OUT, blob)
    best = min(sizes, key=sizes.get)
    return {"blob_bytes": len(blob), "blob_sha256": hashlib.sha256(blob).hexdigest(), "codec": best.split("_")[0],
            "layout": best.split("_")[1], **{f"bytes_{k}": v for k, v in sizes.items()}}


if __name__ == "__main__":
    stage.run(main, "compress")
