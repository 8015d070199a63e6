"""A record's own train_gpt.py beside pgolf's record preset: same GPU, same shards, same seed, same fixed steps.

    python bench/record_parity.py --record PATH/train_gpt.py --mirror DIR [--steps 300] [--batch-tokens N]

The record script comes from openai/parameter-golf (records/track_10min_16mb/<date>_<name>/train_gpt.py; fetched and
carried, never committed) and runs unmodified: bench/standin/ stands in for FlashAttention-3 where it does not
install (PyTorch's FlashAttention-2 varlen kernels; pgolf's side takes the same kernel, its `varlen` backend, unless
--pgolf-attention flex: the ratio then compares everything but the attention kernel). DIR is a CaseOps mirror written by `pgolf mirror --caseops --tokenizer <the record's model>`; the record reads
its dataset folder (DATA_PATH, with the val_bytes sidecars) and tokenizer, pgolf's trainer the same shards. Both run
--steps steps with no wallclock cap (the schedule, the loop switch at 35 % and the warmdown keyed to steps), one after
the other in their own processes. Prints one table: train loss every 25 steps side by side, the mean over the last 100
steps, pre-quantization val bpb (raw and EMA weights; pgolf's also on the record's targets in the record's eval contexts,
`record_segments`), ms/step
and tokens/s before and after the loops switch on, peak memory, compile time. Writes --out, and `record_parity` in
bench/results.json with --results.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from anchor import run_anchor  # noqa: E402

# The record's training-side settings (its README's command); the rest are the script's defaults. WARMUP_STEPS is
# 0, not the README's 20: its warm-up only compiles (every cu_seqlens bucket, loops off and on: 8 full compiles) and
# then restores the initial weights, optimizer state and loader, so the trained model is the same; without it the
# two compiles the run needs happen at step 1 and at the loop switch, outside the phases timed below.
RECORD_ENV = {
    "CASEOPS_ENABLED": "1", "VOCAB_SIZE": "8192", "MATRIX_LR": "0.026", "MIN_LR": "0.1", "GRAD_CLIP_NORM": "0.3",
    "WARMUP_STEPS": "0", "MUON_BACKEND_STEPS": "5", "WARMDOWN_FRAC": "0.85", "BETA2": "0.99",
    "SPARSE_ATTN_GATE_SCALE": "0.5", "GATED_ATTN_QUANT_GATE": "1", "SPARSE_ATTN_GATE_ENABLED": "1",
    "GATE_WINDOW": "12", "SMEAR_GATE_ENABLED": "1", "FUSED_CE_ENABLED": "1", "VAL_LOSS_EVERY": "0",
    "PREQUANT_ONLY": "1", "MAX_WALLCLOCK_SECONDS": "0",
}
LOG_EVERY = 5
RECORD_VAL_SEQS = 524_288 // 8 // 2048  # its eval's batch on one GPU (VAL_BATCH_TOKENS / grad_accum_steps / 2048)
# the step ranges timed, as fractions of the steps (the loops switch at 35 %): 10-100 and 125-300 of 300 steps
PHASES = {"before loops": (1 / 30, 1 / 3), "after loops": (5 / 12, 1.0)}


def dataset(mirror: Path) -> tuple[Path, Path]:
    """The mirror's shard folder and tokenizer (the record's DATA_PATH and TOKENIZER_PATH); one line and exit where
    DIR is no `pgolf mirror` folder."""
    path = mirror / "datasets" / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        return (mirror / "datasets" / "datasets" / manifest["datasets"][0]["name"],
                mirror / "datasets" / manifest["tokenizers"][0]["model_path"])
    except (OSError, ValueError, LookupError, TypeError):
        sys.exit(f"--mirror {mirror}: expected a `pgolf mirror` folder, whose {path.relative_to(mirror)} names a "
                 "dataset and a tokenizer")


def run_record(script: Path, mirror: Path, steps: int, batch_tokens: int, seed: int, log: Path,
               timeout_s: float, speed_only: bool = False) -> dict:
    """The record script to its pre-quantization eval (PREQUANT_ONLY), or with `speed_only` to its last training step
    (its eval's compiles skipped); each output line logged with the seconds since start. Past `timeout_s` it is stopped
    and what it logged so far is returned (`finished` false)."""
    data, tok = dataset(mirror)
    env = {**RECORD_ENV, "DATA_PATH": str(data), "TOKENIZER_PATH": str(tok), "ITERATIONS": str(steps),
           "TRAIN_BATCH_TOKENS": str(batch_tokens), "TRAIN_LOG_EVERY": str(LOG_EVERY), "SEED": str(seed),
           "ARTIFACT_DIR": str(log.parent / "record_artifacts"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "bench" / "standin"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out, _, seconds = run_anchor(script, env, log, timeout_s, lambda line: bool(
        re.match(r"^\d+/\d+ train_loss: (nan|inf)", line) or (speed_only and line.startswith(f"{steps}/{steps} "))))
    return parse_record(out, steps, batch_tokens) | {"wall_s": seconds}


def parse_record(out: str, steps: int, batch_tokens: int) -> dict:
    """The record side's figures from its output (or from the log run_record writes: its time stamps are dropped)."""
    out = re.sub(r"^\[ *[\d.]+s\] ", "", out, flags=re.M)
    trace = []  # (step, train seconds, loss): the script logs cumulative tokens/s, from which its clock follows
    for m in re.finditer(r"^(\d+)/\d+ train_loss: ([\d.]+) train_time: [\d.]+m tok/s: (\d+)", out, re.M):
        step, loss, tps = int(m[1]), float(m[2]), int(m[3])
        trace.append((step, step * batch_tokens / tps, loss))
    raw = re.search(rf"^{steps}/{steps} val_loss: ([\d.]+) val_bpb: ([\d.]+)", out, re.M)
    ema = re.search(r"pre-quantization post-ema val_loss:([\d.]+) val_bpb:([\d.]+)", out)
    mem = re.search(r"peak memory allocated: (\d+) MiB", out)
    return {"trace": trace, "val_bpb_raw": float(raw[2]) if raw else float("nan"),
            "val_bpb_ema": float(ema[2]) if ema else float("nan"),
            "peak_memory_gib": int(mem[1]) / 1024 if mem else float("nan"), "finished": ema is not None}


def record_initial_state(script: Path, seed: int, preset: Path) -> dict:
    """The record's initial weights as its trainer draws them (record_equivalence.record_initial_model), under
    pgolf's names."""
    from pgolf.config import load_params
    from record_equivalence import load_record, record_initial_model, record_to_pgolf

    rec = record_initial_model(load_record(script), seed)
    model = load_params(preset).model
    return {k: v.float() for k, v in record_to_pgolf(rec.state_dict(), model.layers, model.parallel_from).items()}


def run_pgolf(preset: Path, mirror: Path, steps: int, batch_tokens: int, seed: int, save: Path | None,
              doc_attention: str, init: dict | None = None, flex_options: Path | None = None) -> dict:
    """pgolf's trainer on the mirror's shards with the preset's model and schedule, its document masks through
    `doc_attention` (a pgolf.attention backend); in this process. With `init`, training starts from these weights
    (record_initial_state) instead of pgolf's own draw from `seed`. With `save`, the trained weights (EMA) go there
    for bench/eval_modes.py. With `flex_options`, FlexAttention's kernel options from that file (bench/doc_attention.py
    --flex-grid)."""
    import torch

    from pgolf import attention, runtime
    from pgolf.calibrate import calibrate
    from pgolf.config import load_params
    from pgolf.data import load_val
    from pgolf.model import GPT
    from pgolf.score import score
    from pgolf.train import Trainer

    attention.prefer(doc_attention)
    if flex_options:
        attention.tune_flex(json.loads(flex_options.read_text()))
    params = load_params(preset)
    cfg = replace(params.train, iterations=steps, max_seconds=0, calibration_reserve_s=0, batch_tokens=batch_tokens,
                  micro_batch_tokens=batch_tokens // 8, seed=seed, log_every=LOG_EVERY, val_every=0,
                  checkpoint_every_s=0)  # 8 micro-batches a step on one GPU, as the record's grad_accum_steps
    data, _ = dataset(mirror)
    trace = []

    class Traced(Trainer):
        def _log_step(self, loss, scale, step_seconds):
            super()._log_step(loss, scale, step_seconds)
            trace.append((self.step, self.train_seconds, self.losses[-1][1]))
            if not math.isfinite(trace[-1][2]):
                raise SystemExit(f"pgolf: train loss {trace[-1][2]} at step {self.step}")

    t0 = time.perf_counter()
    rt = runtime.init()
    trainer = Traced(params.model, cfg, data, rt, log=print)
    if init is not None:
        trainer.start_from(init)
    result = trainer.run()
    val = load_val(data, params.model.vocab_size)
    model = GPT(params.model).to(rt.device)
    bpb = {}
    for name, weights in (("raw", result.raw), ("ema", result.ema)):
        model.load_state_dict({k: v.to(rt.device) for k, v in weights.items()} if name == "raw" else
                              {**{k: v.to(rt.device) for k, v in result.raw.items()}, **weights})
        model.passes = result.passes
        bpb[name] = score(model, val, cfg.seq_len, 0, 32, device=rt.device, doc_mask=True).bpb
        bpb[f"{name}_record_targets"] = score_segments(model, val, record_segments(val.tokens, params.model.bos_id,
                                                                                   cfg.seq_len), cfg.seq_len, rt.device)
    c = calibrate(model, params.calibrate, data, rt.device)  # the preset's calibration, counted in the train budget
    if save:
        torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()}, "passes": result.passes,
                    "steps": steps, "batch_tokens": batch_tokens, "preset": str(preset)}, save)
    return {"trace": trace, "doc_attention": doc_attention, "val_bpb_raw": bpb["raw"], "val_bpb_ema": bpb["ema"],
            "val_bpb_raw_record_targets": bpb["raw_record_targets"],
            "val_bpb_ema_record_targets": bpb["ema_record_targets"],
            "peak_memory_gib": result.metrics["peak_memory_gib"], "compile_s": result.metrics["compile_seconds"],
            "calibrate_s": round(c.seconds, 2), "calibrate_tokens": c.tokens, "wall_s": time.perf_counter() - t0}


def preset_with(preset: Path, sets: list[str], folder: Path) -> Path:
    """The preset with KEY=VALUE changes (dotted keys, YAML values), written to a new file in `folder` (never over
    one that is there) and checked as params load."""
    import tempfile

    import yaml

    from pgolf.config import load_params
    from pgolf.errors import PgolfError

    raw = yaml.safe_load(preset.read_text())
    for item in sets:
        key, sep, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = raw
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if not sep or not isinstance(node, dict):
            raise SystemExit(f"--set {item}: expected SECTION.KEY=VALUE with a section of {preset.name}")
        node[leaf] = yaml.safe_load(value)
    fd, name = tempfile.mkstemp(prefix="record_parity_preset_", suffix=".yaml", dir=folder)
    out = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(raw, sort_keys=False))
    try:
        load_params(out)
    except PgolfError as e:
        out.unlink()
        raise SystemExit(f"--set {' '.join(sets)}: {str(e).removeprefix(f'{out}: ')}") from None
    return out


def record_segments(tokens, bos_id: int, seq_len: int) -> list[tuple[int, int]]:
    """The stretches of inputs [s, e) the record's eval attends within (targets s+1..e): its batches of
    RECORD_VAL_SEQS * seq_len inputs, each cut at every BOS and every seq_len tokens from a document's start (its
    cu_seqlens), over the targets it scores (`record_targets`)."""
    from pgolf.attention import segment_starts

    n, batch = record_targets(tokens.numel(), seq_len), RECORD_VAL_SEQS * seq_len
    out = []
    for b0 in range(0, n, batch):
        starts = (b0 + segment_starts(tokens[None, b0:b0 + batch], bos_id, seq_len)[0].nonzero().flatten()).tolist()
        out += zip(starts, starts[1:] + [b0 + batch])
    return out


def score_segments(model, val, segments: list[tuple[int, int]], seq_len: int, device) -> float:
    """bpb of the targets of `segments`, each seeing only its own segment (the record's eval contexts: a window from
    the segment's start, document-masked, so the tokens after it are never seen and the ones before it are not in
    the window). Every target up to the last segment's end is scored exactly once."""
    from pgolf.score import Scorer, Window

    if not segments:
        raise SystemExit(f"the val split ({val.tokens.numel():,} tokens) holds none of the record's eval batches "
                         f"({RECORD_VAL_SEQS} x {seq_len} inputs)")
    scorer = Scorer(val, seq_len, 32, 1.0, device, doc_mask=True)
    if segments[-1][0] + scorer.L >= val.tokens.numel():
        raise SystemExit(f"the record's last segment starts at {segments[-1][0]}: its window runs past the split")
    scorer.score(model, [Window(s, 0, e - s) for s, e in segments])
    counts, n = scorer.counts.cpu(), segments[-1][1]
    if not (bool((counts[1:n + 1] == 1).all()) and int(counts[n + 1:].sum()) == 0 and int(counts[0]) == 0):
        raise SystemExit("the record's segments do not score each of its targets exactly once")
    return float(scorer.nll_sum) / math.log(2) / float((scorer.bytes * scorer.counts).sum())


def record_targets(n_tokens: int, seq_len: int) -> int:
    """How many of the first val targets the record's eval scores: whole batches of RECORD_VAL_SEQS windows of
    seq_len, the rest dropped (its `seq_end` truncation)."""
    return (n_tokens - 1) // seq_len // RECORD_VAL_SEQS * RECORD_VAL_SEQS * seq_len


def phase_rates(trace: list, batch_tokens: int, steps: int) -> dict:
    """ms/step and tokens/s over each phase's logged steps (its first logged step past step 1's compile, to its
    last); NaN where the run stopped before two log intervals of the phase."""
    clock = {s: t for s, t, _ in trace}
    out = {}
    for name, (fa, fb) in PHASES.items():
        a = max(LOG_EVERY, math.ceil(fa * steps / LOG_EVERY - 1e-9) * LOG_EVERY)
        b = min(int(fb * steps + 1e-9) // LOG_EVERY * LOG_EVERY, max(clock, default=0))  # a run stopped early: so far
        if a in clock and b in clock and b >= a + 2 * LOG_EVERY:
            sec = (clock[b] - clock[a]) / (b - a)
            out[name] = {"ms_per_step": round(1000 * sec, 1), "tokens_per_s": round(batch_tokens / sec)}
        else:
            out[name] = {"ms_per_step": float("nan"), "tokens_per_s": float("nan")}
    return out


def summary(side: dict, batch_tokens: int, steps: int, common: list[int]) -> dict:
    """The side's figures; its mean train loss over `common`, the last 100 steps' logged steps both sides logged."""
    loss = {s: l for s, _, l in side["trace"]}
    return {"mean_loss_last_100": sum(loss[s] for s in common) / len(common) if common else float("nan"),
            "phases": phase_rates(side["trace"], batch_tokens, steps),
            **{k: v for k, v in side.items() if k != "trace"}}


def table(rec: dict, pg: dict, batch_tokens: int, steps: int, concurrent: bool = False) -> tuple[str, dict]:
    ra, rb = ({s: l for s, _, l in x["trace"]} for x in (rec, pg))
    last = max(set(ra) & set(rb), default=steps)
    common = sorted(s for s in set(ra) & set(rb) if last - 100 < s)  # the record logs steps 1-5, pgolf 1 and 5
    a, b = summary(rec, batch_tokens, steps, common), summary(pg, batch_tokens, steps, common)
    lines = ["| step | record loss | pgolf loss | diff |", "|---|---|---|---|"]
    for s in sorted(set(ra) & set(rb)):
        if s % 25 == 0 or s == 1:
            lines.append(f"| {s} | {ra[s]:.4f} | {rb[s]:.4f} | {rb[s] - ra[s]:+.4f} |")
    lines += ["", "| | record script | pgolf | pgolf vs record |", "|---|---|---|---|"]

    def row(name, x, y, fmt, ratio=True):
        lines.append(f"| {name} | {fmt.format(x)} | {fmt.format(y)} | " + (f"{y / x:.3f} |" if ratio else f"{y - x:+.4f} |"))

    row(f"mean train loss, steps {max(1, last - 99)}-{last}", a["mean_loss_last_100"], b["mean_loss_last_100"], "{:.4f}", False)
    for w in ("raw", "ema"):
        same = b.get(f"val_bpb_{w}_record_targets", float("nan"))  # absent from logs of earlier calls
        row(f"pre-quant val bpb, {w} weights, the record's targets and contexts", a[f"val_bpb_{w}"], same, "{:.4f}", False)
        lines.append(f"| pre-quant val bpb, {w} weights, every target | – | {b[f'val_bpb_{w}']:.4f} | – |")
    for phase in () if concurrent else PHASES:
        row(f"ms/step, {phase}", a["phases"][phase]["ms_per_step"], b["phases"][phase]["ms_per_step"], "{:.1f}")
        row(f"tokens/s, {phase}", a["phases"][phase]["tokens_per_s"], b["phases"][phase]["tokens_per_s"], "{:,}")
    row("peak memory GiB", a["peak_memory_gib"], b["peak_memory_gib"], "{:.2f}")
    lines += ["", "attention: the record's FlashAttention-2 varlen kernels (PyTorch's) through the FA3 stand-in; pgolf's "
              f"{pg.get('doc_attention', '?')}", "val bpb: the record scores whole batches of "
              f"{RECORD_VAL_SEQS} x 2048 inputs (its eval drops the rest of the split), attending within stretches cut at "
              "every BOS, every 2048 tokens from a document's start and each batch's start; pgolf those targets in those "
              "contexts, and every target in document-masked windows of 2048"]
    if concurrent:
        lines.append("both sides ran at once on the GPU: no speed rows (each slowed the other)")
    ratio = None if concurrent else min(b["phases"][p]["tokens_per_s"] / a["phases"][p]["tokens_per_s"] for p in PHASES)
    return "\n".join(lines), {"record": a, "pgolf": b, "tokens_per_s_ratio_min": ratio and round(ratio, 4),
                              "loss_diff_last_100": round(b["mean_loss_last_100"] - a["mean_loss_last_100"], 4),
                              "val_bpb_raw_diff": round(b.get("val_bpb_raw_record_targets", float("nan")) - a["val_bpb_raw"], 4),
                              "val_bpb_ema_diff": round(b.get("val_bpb_ema_record_targets", float("nan")) - a["val_bpb_ema"], 4)}


def pgolf_result(out: str) -> dict:
    return json.loads(out.split("PGOLF_RESULT ", 1)[1].splitlines()[0])


def run_both(args: argparse.Namespace) -> tuple[dict, dict]:
    """The record script, then pgolf's trainer in a process of its own, on one GPU (with --pgolf-first the other way
    round; with --concurrent, both at once: the losses and val bpb are the same, the seconds are not each side's own)."""
    work = args.out.resolve().parent
    cmd = [sys.executable, __file__, "--side", "pgolf", "--mirror", str(args.mirror), "--preset", str(args.preset),
           "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens), "--seed", str(args.seed),
           "--pgolf-attention", args.pgolf_attention, "--pgolf-init", args.pgolf_init, "--record", str(args.record)]
    cmd += ["--save", str(args.save)] if args.save else []
    cmd += ["--flex-options", str(args.flex_options)] if args.flex_options else []
    log = work / "record_parity_pgolf.log"
    with open(log, "w") as f:  # streamed: a side cut by the call's limit still leaves its log
        pgolf = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT) if args.concurrent or args.pgolf_first else None
        if args.pgolf_first:
            pgolf.wait()
        rec = run_record(args.record.resolve(), args.mirror.resolve(), args.steps, args.batch_tokens, args.seed,
                         work / "record_parity_record.log", args.budget_s, args.speed_only)
        print(f"record script: {rec['wall_s']:.0f} s" + ("" if rec["finished"] else " (stopped)"), flush=True)
        pgolf = pgolf or subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        code = pgolf.wait()
    if code:
        print(f"pgolf side failed ({code}):\n{log.read_text()[-1500:]}", flush=True)
        return rec, {"trace": [], "val_bpb_raw": float("nan"), "val_bpb_ema": float("nan"),
                     "peak_memory_gib": float("nan")}
    pg = pgolf_result(log.read_text())
    print(f"pgolf: {pg['wall_s']:.0f} s", flush=True)
    return rec, pg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", type=Path, help="the record's train_gpt.py")
    ap.add_argument("--mirror", type=Path, help="a CaseOps mirror (pgolf mirror --caseops); needed to run")
    ap.add_argument("--preset", type=Path, default=ROOT / "presets" / "record.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-tokens", type=int, default=786_432, help="per step; 8 micro-batches on one GPU")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=Path("record_parity.json"))
    ap.add_argument("--results", type=Path, help="also record the table in this results file (under record_parity, "
                    "or record_parity_concurrent)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop the record script after this many seconds")
    ap.add_argument("--pgolf-attention", choices=("varlen", "flex"), default="varlen",
                    help="pgolf's document-masked attention: the stand-in's kernel (varlen), or its default (flex)")
    ap.add_argument("--speed-only", action="store_true", help="stop the record script at its last training step: "
                    "no val bpb on its side, but its eval's compiles (minutes on a fresh machine) are not waited for")
    ap.add_argument("--pgolf-first", action="store_true", help="pgolf's side before the record's (a call cut by its limit "
                    "in the record's cold compiles still has pgolf's side)")
    ap.add_argument("--concurrent", action="store_true",
                    help="both sides at once (losses and val bpb only: each slows the other, no speed rows)")
    ap.add_argument("--save", type=Path, help="write pgolf's trained weights here (bench/eval_modes.py reads them)")
    ap.add_argument("--record-log", type=Path, help="no run: the record side from a log run_record wrote ...")
    ap.add_argument("--pgolf-log", type=Path, help="... and the pgolf side from the output of --side pgolf")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="pgolf's side with these preset changes, e.g. train.pack=span (an A/B under the harness)")
    ap.add_argument("--pgolf-init", choices=("seed", "record"), default="seed",
                    help="pgolf's initial weights: its own draw from --seed, or the record's (its script's own draw "
                         "from --seed: the two sides then differ in training alone)")
    ap.add_argument("--flex-options", type=Path, help="pgolf's FlexAttention kernel options from this JSON file "
                    "(bench/doc_attention.py --flex-grid)")
    ap.add_argument("--side", choices=("pgolf",), help=argparse.SUPPRESS)  # internal: one side in its own process
    args = ap.parse_args()
    if not (args.record_log and args.pgolf_log) and not (args.mirror and (args.record or args.side)):
        ap.error("to run: --mirror, and --record (or --record-log and --pgolf-log to table saved runs)")
    if args.pgolf_init == "record" and not args.record:
        ap.error("--pgolf-init record: needs --record (the script whose draw pgolf's side starts from)")
    if args.set:
        args.preset = preset_with(args.preset, args.set, args.out.resolve().parent)
    if args.side == "pgolf":
        init = record_initial_state(args.record, args.seed, args.preset) if args.pgolf_init == "record" else None
        print("PGOLF_RESULT " + json.dumps(run_pgolf(args.preset, args.mirror, args.steps, args.batch_tokens, args.seed,
                                                     args.save, args.pgolf_attention, init, args.flex_options)))
        return
    if args.record_log and args.pgolf_log:  # the two sides run in separate device calls, tabled here
        rec = parse_record(args.record_log.read_text(), args.steps, args.batch_tokens)
        pg = pgolf_result(args.pgolf_log.read_text())
        gpu = "the GPU of the logs"
    else:
        rec, pg = run_both(args)
        import torch

        gpu = torch.cuda.get_device_name()
    text, result = table(rec, pg, args.batch_tokens, args.steps, args.concurrent)
    result |= {"gpu": gpu, "concurrent": args.concurrent, "steps": args.steps, "batch_tokens": args.batch_tokens,
               "seed": args.seed, "pgolf_init": args.pgolf_init, "record_script": str(args.record),
               "pgolf_set": args.set, "table": text,
               "traces": {"record": rec["trace"], "pgolf": pg["trace"]}}
    print(text)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.results:
        results = json.loads(args.results.read_text())
        key = "record_parity_concurrent" if args.concurrent else "record_parity"  # the speed table stays
        results[key] = {k: v for k, v in result.items() if k != "traces"}
        args.results.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
