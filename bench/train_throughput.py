"""Training throughput of the real trainer (the train stage's code path) on one config.

    python bench/train_throughput.py --config baseline --data artifacts/tokenize/data --steps 30
Prints ms/step, tokens/s, MFU and peak memory; writes bench/results/train_throughput_<config>.json.
FLOPs/token = 6 * N_matmul + 6 * layers * seq_len * dim   (causal attention scores + values, fwd+bwd).
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from torch._dynamo.utils import counters

sys.path.append(str(Path(__file__).resolve().parents[1]))  # PYTHONPATH may name an older pgolf to compare
from pgolf import attention  # noqa: E402
from pgolf.config import ModelConfig, TrainConfig, load_params  # noqa: E402
from pgolf.model import GPT, CastedLinear  # noqa: E402
from pgolf.train import COMPILE_MODES, PACKINGS, Trainer  # noqa: E402

try:
    from pgolf.runtime import init as init_runtime  # noqa: E402
except ImportError:  # an older pgolf named through PYTHONPATH
    from pgolf.train import init_runtime  # noqa: E402

PEAK_BF16 = 800e12  # dense bf16 matmul rate measured on this workplace's H100s

# The upstream baseline trainer's shape: 9 layers, d=512, 8 heads / 4 KV, MLP 2x, vocab 1024, seq 1024.
BASELINE = (ModelConfig(vocab_size=1024, layers=9, dim=512, heads=8, kv_heads=4, mlp_mult=2.0, activation="relu2",
                        rope_dims=0, logit_softcap=30.0),
            TrainConfig(seq_len=1024, batch_tokens=524_288, micro_batch_tokens=524_288))


def flops_per_token(model: GPT, seq_len: int) -> float:
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, CastedLinear))
    if model.lm_head is None:
        matmul += model.tok_emb.weight.numel()
    cfg = model.cfg
    layers = len(model.layer_order())
    return 6 * matmul + 6 * layers * seq_len * cfg.dim


# kernel name -> the row of the profile's breakdown it is counted in (the first that matches; the rest: "other")
KERNEL_ROWS = (("flex backward", lambda n: n.startswith("triton_tem") and "flex_attention_backward" in n),
               ("flex forward", lambda n: n.startswith("triton_tem") and "flex_attention" in n),
               ("matmuls", lambda n: n.startswith(("nvjet", "sm90_", "sm80_", "ampere_")) or "gemm" in n or "cutlass" in n))


def kernel_breakdown(kernels: list[tuple[str, float]], steps: int) -> dict[str, float]:
    """Device ms per step by KERNEL_ROWS, from (kernel name, microseconds) pairs."""
    rows = dict.fromkeys([name for name, _ in KERNEL_ROWS] + ["other"], 0.0)
    for name, us in kernels:
        rows[next((row for row, match in KERNEL_ROWS if match(name)), "other")] += us / 1e3 / steps
    return rows


def label_optimizers(trainer: Trainer) -> None:
    """Each optimizer's step as a profiler row of its own, labelled once for all the profiled phases."""
    from torch.profiler import record_function

    def labelled(step, name):
        def run():
            with record_function(name):
                step()
        return run

    for opt in trainer.opts:
        opt.step = labelled(opt.step, f"optimizer.{type(opt).__name__}")


def profile(trainer: Trainer, steps: int, passes: int, trace: str = "") -> None:
    """Top device kernels over a few more steps with `passes` recurrent passes running, and how much of the wall time
    the GPU was busy; with `trace`, the steps' timeline as a gzipped Chrome trace at trace_p<passes>.json.gz."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    trainer.model.passes = passes
    trainer._sync()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step(1.0)
        trainer._sync()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    # the kernels alone: an aten op's row also carries its kernels' time, the optimizer annotations span kernels
    # already counted, and "Command Buffer Full" is the host waiting, not the device working
    kernels = [(e.name, e.device_time_total) for e in prof.events()
               if e.device_type == DeviceType.CUDA and e.name != "Command Buffer Full"]
    busy = sum(us for _, us in kernels) / 1e6
    print(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=160))
    for e in events:
        if e.key.startswith("optimizer."):
            print(f"{e.key}: host {e.cpu_time_total / steps / 1e3:.2f} ms/step, "
                  f"device {e.device_time_total / steps / 1e3:.2f} ms/step")
        elif e.key.startswith("pgolf::"):  # custom ops (an older pgolf on PYTHONPATH): dispatch and launch
            print(f"{e.key}: host {e.cpu_time_total / e.count:.0f} us a call, {e.count / steps:.0f} calls a step")
    rows = kernel_breakdown(kernels, steps)
    print(f"kernels: {len(kernels) / steps:.0f} a step; device ms a step: "
          + ", ".join(f"{row} {ms:.1f}" for row, ms in rows.items()))
    if trace:
        prof.export_chrome_trace(f"{trace}_p{passes}.json.gz")
    print(f"profile: {steps} steps, {passes} passes, wall {wall / steps * 1000:.1f} ms/step, device busy {busy / steps * 1000:.1f} ms/step "
          f"({busy / wall:.0%}; includes profiler overhead)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="baseline", help="baseline, or a params file (its model and train sections)")
    ap.add_argument("--data", default="artifacts/tokenize/data")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch-tokens", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--profile", type=int, default=0, help="after the timed steps, profile this many more, before and "
                    "after the loops switch on")
    ap.add_argument("--trace", default="", help="with --profile: write each phase's Chrome trace to TRACE_p<passes>.json.gz")
    ap.add_argument("--batch-tokens", type=int, default=0, help="train.batch_tokens (0: the config's)")
    ap.add_argument("--log-every", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--seed", type=int, default=0, help="0: the config's seed")
    ap.add_argument("--fp8", action="store_true", help="train.fp8: the blocks' projections through FP8 matmuls")
    ap.add_argument("--compile-mode", choices=list(COMPILE_MODES), help="train.compile_mode (cuda_graphs: the step "
                    "recorded and replayed as CUDA graphs)")
    ap.add_argument("--doc-attention", choices=("flex", "varlen"), help="the document masks' backend (train.doc_mask)")
    ap.add_argument("--flex-options", type=Path, help="FlexAttention's kernel options from this JSON file "
                    "(bench/doc_attention.py --flex-grid)")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config settings, e.g. coordinate_descent_tuning=True")
    ap.add_argument("--pack", choices=list(PACKINGS), help="train.pack (span: a micro-batch as one row)")
    args = ap.parse_args()
    attention.prefer(args.doc_attention)
    import torch._inductor.config  # noqa: F401 - the attribute exists once imported
    for setting in args.inductor:
        key, value = setting.split("=", 1)
        setattr(torch._inductor.config, key, yaml.safe_load(value))  # True, 1, 0.5 or a string, as written
    if args.flex_options:
        attention.tune_flex(json.loads(args.flex_options.read_text()))
    if args.config == "baseline":
        mcfg, tcfg = BASELINE
    else:
        p = load_params(args.config)
        mcfg, tcfg = p.model, p.train
    tcfg = dataclasses.replace(tcfg, iterations=args.steps, max_seconds=0, compile=not args.no_compile,
                               compile_warmup_steps=args.warmup, log_every=args.log_every or max(args.steps // 5, 1),
                               checkpoint_every_s=0, val_every=0, warmup_steps=min(tcfg.warmup_steps, 5),
                               micro_batch_tokens=args.micro_batch_tokens or tcfg.micro_batch_tokens,
                               batch_tokens=args.batch_tokens or tcfg.batch_tokens,
                               seed=args.seed or tcfg.seed, fp8=args.fp8 or tcfg.fp8,
                               compile_mode=args.compile_mode or tcfg.compile_mode, pack=args.pack or tcfg.pack)
    rt = init_runtime()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(mcfg, tcfg, Path(args.data), rt, log=lambda s: print(s, flush=True) if rt.master else None)
    m = trainer.run().metrics
    fpt = flops_per_token(trainer.model, tcfg.seq_len)
    tok_s = m["tokens_per_second"]
    row = {"config": Path(args.config).stem, "compile": tcfg.compile, "fp8": tcfg.fp8, "compile_mode": tcfg.compile_mode,
           "doc_attention": args.doc_attention or "default",
           "flex_options": str(args.flex_options or "default"), "inductor": args.inductor, "pack": tcfg.pack,
           "micro_batch_tokens": tcfg.micro_batch_tokens,
           "world": rt.world, "steps": m["steps"], "ms_per_step": m["ms_per_step"], "tokens_per_s": tok_s,
           "flops_per_token": fpt, "mfu": round(fpt * tok_s / (PEAK_BF16 * rt.world), 4),
           "peak_memory_gib": m["peak_memory_gib"], "compile_seconds": m["compile_seconds"],
           "final_loss": m["final_train_loss"], "seed": tcfg.seed, "log_every": tcfg.log_every, "losses": trainer.losses, "gpu": m["gpu"],
           "graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"]["unique_graphs"]}
    if args.profile and rt.master:
        label_optimizers(trainer)
        for passes in sorted({0, trainer.model.max_passes}):
            profile(trainer, args.profile, passes, args.trace)
    if rt.master:
        out = Path("bench/results")
        out.mkdir(parents=True, exist_ok=True)
        tag = args.tag or f"{row['config']}_{'compiled' if tcfg.compile else 'eager'}_w{rt.world}"
        (out / f"train_throughput_{tag}.json").write_text(json.dumps(row, indent=2))
        print("| config | compile | world | ms/step | tokens/s | MFU | peak GiB | final loss |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {row['config']} | {row['compile']} | {row['world']} | {row['ms_per_step']} | {tok_s:,.0f} | "
              f"{row['mfu']:.1%} | {row['peak_memory_gib']} | {row['final_loss']:.4f} |")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
