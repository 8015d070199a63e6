"""Eval modes on one checkpoint: bpb, seconds, and a projection of the seconds on 8 GPUs over FineWeb's val split.

    python bench/eval_modes.py --checkpoint CKPT --mirror DIR [--preset presets/record.yaml] [--only NAME ...] [--eager]
        [--cuda-graphs] [--regional] [--cheaper 96x2048 ...] [--record-log PATH/train_seed42.log]

CKPT is written by `bench/record_parity.py --save` (the record preset's trained weights, EMA, unquantized). Each row
runs one of pgolf's eval modes (evaluate.MODES) on a fresh copy of the model, in the record's windows of 2048
tokens, the preset's eval settings otherwise:

- `sliding`: windows of eval.seq_len at eval.stride, across documents;
- `document-masked`: the same windows, each target seeing only its own document;
- `phased SGD`: phased_ttt (global SGD after each phase of the prefix, sliding windows);
- `LoRA`: lora_ttt, per-document LoRAs in chunks of 48 (the record's settings: rank 80, Adam lr 1e-4, betas 0/0.99,
  weight decay 0.5, 64 documents at once), its forward compiled (eval.ttt.compile);
- `LoRA + phased SGD`: the same with global SGD (lr 0.001) after each of 3 phases of the prefix;
- `LoRA, CUDA graphs` (with --cuda-graphs): the LoRA row with eval.ttt.compile_mode: cuda_graphs (shapes padded to a
  few, each step replayed);
- `LoRA, C x L` and `LoRA + phased SGD, C x L` (with --cheaper CxL): the same with chunks of C targets in windows of
  up to L tokens (larger chunks: fewer steps a document, each LoRA step later; shorter windows: less context);
- `<a compiled LoRA row>, regional` (with --regional): that row with eval.ttt.compile_mode: regional (each block
  compiled on its own, the blocks and passes sharing their graphs: a block's compile, not the whole network's);
- `LoRA, eager` (with --eager): the first LoRA row uncompiled (the compile's gain).

The prefix is the same fraction of this split's documents as the record's 2,500 of FineWeb's 50,000 (5 %). Seconds are
the mode's wall time (model build excluded, first-use compiles included, except a compiled LoRA row's: its compile is
paid on its first documents beforehand and reported as compile s). The rows of each process compile into a cache of
their own, empty at the start (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR): the first compiled row of a compile mode
compiles cold, as on a fresh eval machine, and the rows after it find its kernels, so their projections take that
cold compile, not their own. The projection scales the seconds by FineWeb's 47,851,520 val targets over this
split's, divides by 8 GPUs and adds the compile once: a projection from one GPU, not a measurement. The docs corpus
has longer documents than FineWeb, and a LoRA step's work per target grows with its document's length (up to the
window): with --record-log, a LoRA row is also projected by the tokens its steps run on FineWeb's documents over
this split's (bench/ttt_cost.py; FineWeb's lengths from the record's log), and the pick goes by that. Each row runs
in a process of its own (a row that crashes it, as call 44's segmentation fault in the CUDA-graphs row, is reported
as failed and the others still run), but for the compiled LoRA rows: those of one compile mode share one, as an eval
pays one compile (the rows after the first reuse its compiled forward).
Prints a table, writes --out.
"""

import argparse
import copy
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ttt_cost  # noqa: E402
from record_parity import dataset  # noqa: E402
from pgolf import evaluate, runtime  # noqa: E402
from pgolf.config import load_params  # noqa: E402
from pgolf.data import load_val  # noqa: E402
from pgolf.lora import documents  # noqa: E402
from pgolf.model import GPT  # noqa: E402

FINEWEB_VAL_TARGETS = 47_851_520  # the record's val_tokens (train_seed42.log)
PREFIX_FRACTION = 2_500 / 50_000
EVAL_BUDGET_S = 540  # the preset takes the best row projected under this (60 s of the 600 kept for decode and load)
WARM_DOCS = 3  # documents a compiled row's compile is paid on before it is timed
RECORD_SEQ_LEN = 2048
RECORD_PHASED_SGD = {"optimizer": "sgd", "lr": 0.001, "momentum": 0.9}
RECORD_LORA = {"lr": 1e-4, "betas": [0.0, 0.99], "weight_decay": 0.5, "lora_rank": 80, "lora_alpha": 144.0,
               "chunk_tokens": 48, "batch_docs": 64, "grad_steps": 1}


def variants(cfg, n_docs: int, eager: bool, cheaper: list[tuple[int, int]], graphs: bool = False,
             regional: bool = False) -> dict:
    """name -> EvalConfig (with `eager`, LoRA uncompiled beside the compiled row; with `graphs`, LoRA with its steps
    replayed as CUDA graphs (eval.ttt.compile_mode: cuda_graphs); each (chunk, context) of `cheaper`
    adds both LoRA rows with chunks of that many targets and windows of that many tokens: fewer or shorter steps than
    the record's 48 and 2048, for a projection that fits; with `regional`, each compiled LoRA row also compiled block
    by block (eval.ttt.compile_mode: regional))."""
    prefix = max(1, round(PREFIX_FRACTION * n_docs))
    cfg = replace(cfg, seq_len=RECORD_SEQ_LEN)  # the rows are the record's, whichever mode the preset now takes
    lora = replace(cfg.ttt, **RECORD_LORA, prefix_docs=prefix, phases=3, compile=True, compile_mode="default")
    rows = {
        "sliding": replace(cfg, mode="sliding", doc_mask=False),
        "document-masked": replace(cfg, mode="sliding", doc_mask=True),
        "phased SGD": replace(cfg, mode="phased_ttt", doc_mask=True, ttt=replace(cfg.ttt, **RECORD_PHASED_SGD,
                                                                                 prefix_docs=prefix)),
        "LoRA": replace(cfg, mode="lora_ttt", ttt=replace(lora, global_lr=0.0)),
        "LoRA + phased SGD": replace(cfg, mode="lora_ttt", ttt=replace(lora, global_lr=0.001, momentum=0.9)),
    }
    if graphs:
        rows["LoRA, CUDA graphs"] = replace(cfg, mode="lora_ttt", ttt=replace(lora, global_lr=0.0,
                                                                               compile_mode="cuda_graphs"))
    for c, L in cheaper:
        rows[f"LoRA, {c} x {L}"] = replace(cfg, mode="lora_ttt", seq_len=L, ttt=replace(lora, global_lr=0.0,
                                                                                          chunk_tokens=c))
        rows[f"LoRA + phased SGD, {c} x {L}"] = replace(cfg, mode="lora_ttt", seq_len=L, ttt=replace(
            lora, global_lr=0.001, momentum=0.9, chunk_tokens=c))
    if regional:
        rows |= {f"{name}, regional": replace(c, ttt=replace(c.ttt, compile_mode="regional"))
                 for name, c in rows.items() if c.mode == "lora_ttt" and c.ttt.compile_mode == "default"}
    if eager:
        rows["LoRA, eager"] = replace(cfg, mode="lora_ttt", ttt=replace(lora, global_lr=0.0, compile=False))
    return rows


def warm_compile(base: GPT, val, cfg, docs: list[tuple[int, int]], device: torch.device) -> float:
    """A compiled LoRA row's compile, paid once on its first WARM_DOCS documents and timed: the row then runs on the
    warm caches, and the projection adds the compile once (each GPU compiles in parallel) instead of scaling it with
    the targets. 0 for the other rows (their first-use compiles stay in their seconds)."""
    if cfg.mode != "lora_ttt" or not cfg.ttt.compile:
        return 0.0
    head = val.head(docs[min(WARM_DOCS, len(docs)) - 1][1] + 1)
    t0 = time.perf_counter()
    evaluate.evaluate(copy.deepcopy(base).to(device), head, replace(cfg, ttt=replace(cfg.ttt, global_lr=0.0)), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_row(args: argparse.Namespace, name: str, cheaper: list[tuple[int, int]]) -> dict:
    """One row, in this process: its compile (a compiled LoRA row's), then the mode on a fresh copy of the model."""
    params = load_params(args.preset)
    rt = runtime.init()
    ckpt = torch.load(args.checkpoint, map_location="cpu")
    base = GPT(params.model)
    base.load_state_dict(ckpt["state"])
    base.passes = ckpt["passes"]
    val = load_val(dataset(args.mirror)[0], params.model.vocab_size)
    docs = documents(val.tokens, params.model.bos_id)
    cfg = variants(params.eval, len(docs), args.eager, cheaper, args.cuda_graphs, args.regional)[name]
    compile_s = warm_compile(base, val, cfg, docs, rt.device)
    model = copy.deepcopy(base).to(rt.device)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    s, record = evaluate.evaluate(model, val, cfg, rt.device)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"mode": name, "eval_mode": cfg.mode, "val_bpb": round(s.bpb, 5), "seconds": round(seconds, 1),
            "compile_s": round(compile_s, 1), "targets": s.tokens,
            **{k: v for k, v in record.items() if isinstance(v, (int, float, str))}}


def chosen(rows: dict, only: list[str] | None) -> dict:
    """The rows of `only`, in its order (the first runs first: the row that matters most is not left to the budget's
    end), or all of them; a name not among them is refused with the rows there are."""
    unknown = [name for name in only or [] if name not in rows]
    if unknown:
        raise KeyError(f"--only {', '.join(map(repr, unknown))}: no such row with these flags; the rows: "
                       f"{', '.join(rows)}")
    return {name: rows[name] for name in only or rows}


SHARED_COMPILES = ("default", "regional")  # compile modes whose rows share a process (cuda_graphs: each alone)


def units(rows: dict) -> list[list[str]]:
    """The rows grouped by process: the compiled LoRA rows of one compile mode (default, regional) share one, so that
    they share one compile as an eval would (in one process the later rows reuse the first one's compiled forward: 2.5
    s against 95 s cold on a CPU); each other row has one of its own (a crash, as the CUDA-graphs row's in call 44,
    takes no other row with it)."""
    def group(c) -> str | None:
        shared = c.mode == "lora_ttt" and c.ttt.compile and c.ttt.compile_mode in SHARED_COMPILES
        return c.ttt.compile_mode if shared else None

    out: dict[str, list[str]] = {}
    for name, c in rows.items():
        out.setdefault(group(c) or name, []).append(name)
    return list(out.values())


def unit_in_child(argv: list[str], names: list[str], cache: str, budget_s: float) -> tuple[list[dict], str | None]:
    """run_row for each of `names` in one fresh process (its own CUDA context; compiled code from `cache` only), none
    started after `budget_s`: the rows it finished, and why it stopped early (None: it did not)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
    proc = subprocess.run([sys.executable, __file__, *argv, "--row-budget-s", str(budget_s), "--row", *names],
                          stdout=subprocess.PIPE, text=True, env=env)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode == 0:
        return rows, None
    if proc.returncode < 0:
        return rows, f"failed: killed by {signal.Signals(-proc.returncode).name}"
    return rows, f"failed: exit status {proc.returncode} (its error is above)"


def projected(row: dict, cfg, cold: float | None, fineweb, lengths) -> dict:
    """`row` with its 8-GPU projection: the seconds scaled to FineWeb's val targets (a LoRA row's also by the tokens
    its steps run, with `fineweb`'s document lengths) over 8 GPUs, plus the compile a fresh machine pays: the first
    compiled row's (`cold`), or the row's own if longer (the rows after the first found its kernels, or its graph)."""
    if row["compile_s"] > 0:
        row["compile_projected_s"] = max(row["compile_s"], cold or 0.0)
    compile_s = row.get("compile_projected_s", 0.0)
    row["projected_8gpu_s"] = round(compile_s + row["seconds"] * FINEWEB_VAL_TARGETS / row["targets"] / 8, 1)
    if fineweb is not None and cfg.mode == "lora_ttt":  # the LoRA steps' work, not the targets, scaled
        work = [ttt_cost.lora_work(n, cfg.ttt.chunk_tokens, cfg.seq_len, cfg.ttt.batch_docs) for n in (fineweb, lengths)]
        row["projected_8gpu_s_work"] = round(compile_s + row["seconds"] * work[0] / work[1] / 8, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--mirror", type=Path, required=True, help="the mirror the checkpoint was trained on")
    ap.add_argument("--preset", type=Path, default=ROOT / "presets" / "record.yaml")
    ap.add_argument("--only", nargs="*", help="these rows only, in this order")
    ap.add_argument("--eager", action="store_true", help="also LoRA TTT uncompiled")
    ap.add_argument("--cuda-graphs", action="store_true", help="also LoRA TTT replayed as CUDA graphs")
    ap.add_argument("--regional", action="store_true", help="also each compiled LoRA row compiled block by block")
    ap.add_argument("--cheaper", nargs="*", default=[], metavar="CHUNKxCONTEXT",
                    help="also the LoRA rows with these chunk sizes and windows, e.g. 96x2048 48x1024")
    ap.add_argument("--record-log", type=Path, help="the 1.0611 record's train_seed42.log: FineWeb's document lengths "
                    "for the LoRA rows' work-based projection (bench/ttt_cost.py)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no row after this many seconds")
    ap.add_argument("--out", type=Path, default=Path("eval_modes.json"))
    ap.add_argument("--row", nargs="+", help=argparse.SUPPRESS)  # internal: these rows, in this process
    ap.add_argument("--row-budget-s", type=float, default=1e9, help=argparse.SUPPRESS)  # internal: start none after
    argv = sys.argv[1:]
    args = ap.parse_args()
    try:
        cheaper = [tuple(int(v) for v in c.split("x")) for c in args.cheaper]
        assert all(len(c) == 2 and min(c) > 0 for c in cheaper)
    except (ValueError, AssertionError):
        ap.error(f"--cheaper {' '.join(args.cheaper)}: expected CHUNKxCONTEXT pairs of positive integers, e.g. 96x2048")
    if args.row:
        faulthandler.enable()  # a crash prints the Python stack it happened in
        t_child = time.perf_counter()
        for name in args.row:
            if time.perf_counter() - t_child <= args.row_budget_s:
                print("ROW " + json.dumps(run_row(args, name, cheaper)), flush=True)
        return
    t_start = time.perf_counter()
    params = load_params(args.preset)
    val = load_val(dataset(args.mirror)[0], params.model.vocab_size)
    docs = documents(val.tokens, params.model.bos_id)
    n_docs, lengths = len(docs), np.array([e - s for s, e in docs])
    fineweb = ttt_cost.fineweb_doc_lengths(args.record_log.read_text()) if args.record_log else None
    rows, failed, cold = [], {}, {}  # cold: compile mode -> its first compiled row's compile s
    try:
        configs = chosen(variants(params.eval, n_docs, args.eager, cheaper, args.cuda_graphs, args.regional), args.only)
    except KeyError as e:
        ap.error(e.args[0])
    for unit in units(configs):
        left = args.budget_s - (time.perf_counter() - t_start)
        cache = tempfile.mkdtemp(prefix="eval_modes_compile_")  # each process compiles cold, as a fresh machine
        try:
            done, why = unit_in_child(argv, unit, cache, left) if left >= 0 else ([], None)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        for row in done:
            mode = configs[row["mode"]].ttt.compile_mode
            rows.append(projected(row, configs[row["mode"]], cold.get(mode), fineweb, lengths))
            if mode not in cold and row["compile_s"] > 0:
                cold[mode] = row["compile_s"]
            print(json.dumps(row), flush=True)
        for k, name in enumerate(unit[len(done):]):
            said = "not started (budget)" if not why else why if k == 0 else "not run: its process failed before it"
            print(f"{name}: {said}", flush=True)
            if why:
                failed[name] = said
    gpu = runtime.gpu_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"\n{len(val.tokens) - 1:,} val targets, {n_docs} documents, {gpu}; projection: the first compiled row's "
          f"(cold) compile s of its compile mode, or a row's own if longer, + seconds x {FINEWEB_VAL_TARGETS:,} / "
          "targets / 8; for LoRA rows with --record-log, x FineWeb's LoRA work / this split's instead "
          "(bench/ttt_cost.py)")
    print("| mode | val bpb | vs sliding | seconds | compile s | projected 8-GPU s | by LoRA work |\n"
          "|---|---|---|---|---|---|---|")
    ref = next((r["val_bpb"] for r in rows if r["mode"] == "sliding"), None)
    for r in rows:
        vs = "–" if ref is None else f"{r['val_bpb'] - ref:+.5f}"
        print(f"| {r['mode']} | {r['val_bpb']:.5f} | {vs} | {r['seconds']} | {r['compile_s']} | "
              f"{r['projected_8gpu_s']} | {r.get('projected_8gpu_s_work', '–')} |")
    fits = [r for r in rows if r.get("projected_8gpu_s_work", r["projected_8gpu_s"]) <= EVAL_BUDGET_S]
    pick = min(fits, key=lambda r: r["val_bpb"])["mode"] if fits else None
    print(f"best projected within {EVAL_BUDGET_S} s: {pick or 'none'}")
    args.out.write_text(json.dumps({"gpu": gpu, "checkpoint": str(args.checkpoint), "documents": n_docs,
                                    "val_targets": len(val.tokens) - 1, "rows": rows, "failed": failed,
                                    "pick": pick}, indent=1) + "\n")


if __name__ == "__main__":
    main()
