"""Upstream's train_gpt.py beside pgolf's baseline-equivalent config: one GPU, the same shards, batch and steps.

    python bench/upstream_ratio.py --upstream PATH/train_gpt.py --mirror DIR [--steps 60] [--micro 65536 131072]
        [--out upstream_ratio.json] [--results bench/results.json]

Upstream's script (openai/parameter-golf's train_gpt.py; fetched and carried, never committed) runs unmodified on DIR, a
FineWeb-format mirror of vocabulary 1024 (`pgolf mirror CORPUS --vocab 1024 --out DIR`): its 524,288 tokens a step in
8 micro-batches of 65,536 on one GPU, its 20 warm-up steps (compiles, then the initial weights restored), then --steps
timed steps, stopped at its last one (its final eval and int8 export are not waited for). Its ms/step comes from the
train_time it logs (synchronized by the loss it prints) between step SKIP and the last. pgolf's side is
bench/train_throughput.py --config baseline on the same shards and steps, once per --micro (its micro-batch tokens,
the global batch the same), each in a process of its own, after upstream's. Prints each side's row as it ends, then
the table with the ratios (upstream ms/step ÷ pgolf's); writes --out after each side (a run cut by its call's limit
keeps the rows it finished), and with --results `throughput_vs_anchors.upstream_ratio` (pgolf's fastest micro-batch
so far) and `upstream_ratio_micro_65536` (upstream's own geometry) in that file.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from anchor import run_anchor  # noqa: E402
from record_parity import dataset  # noqa: E402

BATCH_TOKENS = 524_288  # upstream's TRAIN_BATCH_TOKENS, the baseline config's batch_tokens
SKIP = 10  # upstream's first steps after its warm-up, left out of its ms/step (train_throughput warms up the same)
STEP_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:([\d.]+) train_time:(\d+)ms", re.M)


def upstream_env(data: Path, tokenizer: Path, steps: int, seed: int) -> dict[str, str]:
    # WARMDOWN_ITERS: upstream's default 1,200 would hold a 60-step run under 60 / 1,200 of its peak learning rate
    # (its losses then say nothing beside pgolf's); the speed is the same either way
    return {"DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer), "VOCAB_SIZE": "1024", "ITERATIONS": str(steps),
            "WARMDOWN_ITERS": str(steps // 2), "TRAIN_BATCH_TOKENS": str(BATCH_TOKENS), "VAL_LOSS_EVERY": "0",
            "TRAIN_LOG_EVERY": "5", "MAX_WALLCLOCK_SECONDS": "0", "SEED": str(seed), "RUN_ID": "upstream_ratio"}


def parse_upstream(out: str, steps: int) -> dict:
    """ms/step and tokens/s over steps SKIP..steps, from upstream's logged cumulative train_time; the last loss."""
    logged = {int(m[1]): (float(m[3]), int(m[4])) for m in STEP_LINE.finditer(out)}
    if SKIP not in logged or steps not in logged:
        raise ValueError(f"upstream logged no step {SKIP} or {steps} (steps logged: {sorted(logged)[-5:]})")
    ms = (logged[steps][1] - logged[SKIP][1]) / (steps - SKIP)
    return {"ms_per_step": round(ms, 2), "tokens_per_s": round(BATCH_TOKENS / ms * 1e3),
            "final_loss": logged[steps][0], "micro_batch_tokens": BATCH_TOKENS // 8}


def run_pgolf(data: Path, steps: int, micro: int) -> dict:
    tag = f"upstream_ratio_m{micro}"
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--config", "baseline", "--data", str(data),
           "--steps", str(steps), "--micro-batch-tokens", str(micro), "--tag", tag]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pgolf's side at micro {micro} failed:\n{(done.stdout + done.stderr)[-2000:]}")
    r = json.loads((ROOT / "bench" / "results" / f"train_throughput_{tag}.json").read_text())
    return {k: r[k] for k in ("ms_per_step", "tokens_per_s", "final_loss", "micro_batch_tokens", "mfu",
                              "peak_memory_gib", "compile_seconds")}


def table(up: dict, sides: list[dict]) -> tuple[str, dict]:
    lines = ["| trainer | micro-batch | ms/step | tokens/s | final loss | pgolf vs upstream |", "|---|---|---|---|---|---|",
             f"| upstream train_gpt.py | {up['micro_batch_tokens']:,} | {up['ms_per_step']:.1f} | "
             f"{up['tokens_per_s']:,} | {up['final_loss']:.4f} | 1 |"]
    ratios = {}
    for s in sides:
        ratios[s["micro_batch_tokens"]] = round(up["ms_per_step"] / s["ms_per_step"], 4)
        lines.append(f"| pgolf, baseline config | {s['micro_batch_tokens']:,} | {s['ms_per_step']:.1f} | "
                     f"{s['tokens_per_s']:,.0f} | {s['final_loss']:.4f} | **{ratios[s['micro_batch_tokens']]:.3f}** |")
    return "\n".join(lines), ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", type=Path, required=True, help="upstream's train_gpt.py")
    ap.add_argument("--mirror", type=Path, required=True, help="a vocabulary-1024 mirror (pgolf mirror --vocab 1024)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--micro", type=int, nargs="+", default=[65_536, 131_072],
                    help="pgolf's micro-batch tokens, one run each (524,288 must be a multiple)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--budget-s", type=float, default=400, help="stop upstream's script after this many seconds")
    ap.add_argument("--out", type=Path, default=Path("upstream_ratio.json"))
    ap.add_argument("--results", type=Path, help="also record the ratios under throughput_vs_anchors in this file")
    args = ap.parse_args()
    if args.steps <= SKIP:
        ap.error(f"--steps: more than {SKIP} (the first {SKIP} are left out of upstream's ms/step)")
    bad = [m for m in args.micro if m <= 0 or BATCH_TOKENS % m]
    if bad:
        ap.error(f"--micro: {bad} do not divide the batch of {BATCH_TOKENS:,} tokens")
    data, tok = dataset(args.mirror.resolve())
    log = args.out.resolve().parent / "upstream_ratio_upstream.log"
    last = f"step:{args.steps}/{args.steps} train_loss:"
    out, _, seconds = run_anchor(args.upstream.resolve(), upstream_env(data, tok, args.steps, args.seed), log,
                                 args.budget_s, lambda line: line.startswith(last))
    import torch

    gpu, sides = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", []
    try:
        up = parse_upstream(out, args.steps) | {"wall_s": round(seconds, 1)}
        print(f"upstream: {up['ms_per_step']:.1f} ms/step, {up['tokens_per_s']:,} tokens/s", flush=True)
        save(args, gpu, up, sides)
        for micro in args.micro:  # saved after each: a run cut by its call's limit keeps the rows finished
            sides.append(run_pgolf(data, args.steps, micro))
            text = save(args, gpu, up, sides)
            print(text.splitlines()[-1], flush=True)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"upstream_ratio: {e} (upstream's log: {log})")
    print(text)


def save(args: argparse.Namespace, gpu: str, up: dict, sides: list[dict]) -> str:
    """--out (and with --results its entries) from upstream's side and pgolf's sides so far; the table."""
    text, ratios = table(up, sides)
    result = {"gpu": gpu, "steps": args.steps, "batch_tokens": BATCH_TOKENS, "upstream": up, "pgolf": sides,
              "ratios_by_micro": ratios, "table": text}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.results and ratios:
        results = json.loads(args.results.read_text())
        anchors = results.setdefault("throughput_vs_anchors", {})
        anchors["upstream_ratio"] = max(ratios.values())
        if 65_536 in ratios:
            anchors["upstream_ratio_micro_65536"] = ratios[65_536]
        anchors["upstream_side_by_side"] = {k: v for k, v in result.items() if k != "table"}
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    return text


if __name__ == "__main__":
    main()
