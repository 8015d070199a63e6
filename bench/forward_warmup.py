"""Where a stage's first model forward goes: every stage that runs the model on a GPU (ema, calibrate, eval) pays a
start-up before its first batch. Each variant runs in a fresh process, as a stage does: the imports, the first CUDA
call, the model's build, the first forward of an eval batch, the second, then the steady ms per batch.
Prints a table, writes bench/results/forward_warmup.json (or --out=PATH).
    python bench/forward_warmup.py [--preset=presets/challenge.yaml] [--out=PATH] default no_fused_qk sdpa_flash
"""

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))
from points import parse_args, print_table, save  # noqa: E402

BATCH, SEQ, STEADY = 32, 2048, 8


def one(variant: str, preset: str) -> dict:
    """In this process: the timings of one variant."""
    t0 = time.perf_counter()
    import torch

    from pgolf import fused_qk, model
    from pgolf.config import load_params

    out = {"variant": variant, "import_s": time.perf_counter() - t0}
    if variant == "no_fused_qk":
        fused_qk.enabled = False
    if variant == "sdpa_flash":
        model.CUDA_SDPA_ORDER.insert(0, model.CUDA_SDPA_ORDER.pop(1))
    t = time.perf_counter()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    out["cuda_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gpt = model.GPT(load_params(preset).model).cuda().eval()
    torch.cuda.synchronize()
    out["build_s"] = time.perf_counter() - t
    idx = torch.randint(0, gpt.cfg.vocab_size, (BATCH, SEQ + 1), device="cuda")

    def forward() -> float:
        t = time.perf_counter()
        with torch.no_grad(), model.autocast(idx.device):
            gpt.token_nll(idx[:, :-1], idx[:, 1:]).sum().item()
        return time.perf_counter() - t

    out["first_s"], out["second_s"] = forward(), forward()
    out["steady_ms"] = 1000 * sum(forward() for _ in range(STEADY)) / STEADY
    out["total_s"] = time.perf_counter() - t0
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    options, points = parse_args(sys.argv[1:] or ["default", "no_fused_qk", "sdpa_flash"])
    preset = options.get("preset", "presets/challenge.yaml")
    if "variant" in options:  # a child
        print(json.dumps(one(options["variant"], preset)))
        return
    out = Path(options.get("out", "bench/results/forward_warmup.json"))
    rows = []
    for name, _ in points:
        t = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, f"--variant={name}", f"--preset={preset}"],
                               capture_output=True, text=True)
        if child.returncode:
            print(f"{name}: failed\n{child.stderr[-2000:]}")
            continue
        rows.append(json.loads(child.stdout.splitlines()[-1]) | {"process_s": round(time.perf_counter() - t, 3)})
        print(json.dumps(rows[-1]), flush=True)
        save(out, {"batch": BATCH, "seq_len": SEQ}, rows)
    print_table(rows, {c: "{" + c + "}" for c in ("variant", "import_s", "cuda_init_s", "build_s", "first_s",
                                                 "second_s", "steady_ms", "process_s")})


if __name__ == "__main__":
    main()
