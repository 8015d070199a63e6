"""The record's model and pgolf's record preset given one set of weights: do they compute the same function? (CPU)

Loads a record's train_gpt.py (fetched from openai/parameter-golf, never committed) as a module through the FA3
stand-in (bench/standin), builds its GPT with the settings record_parity.py runs it with, sets every parameter to
random values (the gates and lane weights the record zero- or one-initializes would otherwise hide their paths), copies
them into pgolf's GPT by name and compares, in float32, the logits and the mean NLL of one packed row of real val
tokens, attended within stretches cut at every BOS and every --seq-len tokens from a document's start (the record's
cu_seqlens), with the loops off and on. A difference here is a difference of the models; none means a gap between the
two sides' val bpb comes from training. A second pair of rows casts the record's model as its trainer does (to bf16 and
back: its tied embedding stays bf16 in training, and its RoPE frequencies, a buffer, are rounded to bf16 for good)
before the weights are copied, beside the preset as it is (model.rope_freq_dtype: bfloat16 rounds pgolf's alike):
the record's trained model's function against pgolf's. With --train-step N, both trainers also take one step from
the record's initial weights on N train tokens (train_step_rows): the gradients and each optimizer's updates compared.
Prints tables, writes --out.
  python bench/record_equivalence.py --record .carry/record/train_gpt.py --mirror .carry/caseops_mirror [--train-step 4096]
"""

import argparse
import importlib.util
import json
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "standin"))

from record_parity import RECORD_ENV, dataset  # noqa: E402

from pgolf.attention import _cu_seqlens, document_mask  # noqa: E402
from pgolf.config import load_params  # noqa: E402
from pgolf.data import load_val  # noqa: E402
from pgolf.model import GPT  # noqa: E402


def load_record(script: Path):
    """The record's module, its Hyperparameters read from RECORD_ENV (they are class attributes read at import)."""
    os.environ.update(RECORD_ENV)
    spec = importlib.util.spec_from_file_location("record_train_gpt", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.BOS_ID = 1  # set by its loaders at run time
    return module


def cast_as_trained(record_module, rec):
    """The record's model cast as its train_model casts it: to bf16, then all but the tied embedding back to float32
    (its RoPE frequencies, a buffer, stay rounded to bf16)."""
    rec = rec.bfloat16()
    record_module.restore_fp32_params(rec)
    return rec


def record_initial_model(record_module, seed: int):
    """The record's model as its trainer starts it: seeded as its train_and_eval seeds, built on the host, cast."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return cast_as_trained(record_module, record_module.GPT(record_module.Hyperparameters()))


def record_to_pgolf(state: dict, layers: int, parallel_from: int) -> dict:
    """The record's parameter names (banked matrices, model-level lane weights) as pgolf's."""
    n, out = layers, {}
    for name, t in state.items():
        if name in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank", "parallel_post_lambdas",
                    "parallel_resid_lambdas"):
            continue
        name = (name.replace("smear_gate.weight", "smear.gate.weight").replace("smear_lambda", "smear.lam")
                .replace("attn.attn_gate_w", "attn.sparse_gate"))
        out[name] = t
    for i in range(n):
        b = f"blocks.{i}"
        out |= {f"{b}.attn.q.weight": state["qo_bank"][i], f"{b}.attn.proj.weight": state["qo_bank"][n + i],
                f"{b}.attn.k.weight": state["kv_bank"][i], f"{b}.attn.v.weight": state["kv_bank"][n + i],
                f"{b}.mlp.fc.weight": state["mlp_up_bank"][i], f"{b}.mlp.proj.weight": state["mlp_down_bank"][i]}
        if i >= parallel_from:
            out |= {f"{b}.lane_post": state["parallel_post_lambdas"][i],
                    f"{b}.lane_resid": state["parallel_resid_lambdas"][i]}
    return out


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn afresh at its own scale (at least 0.1 for the ones initialized constant), so that no path
    is hidden by a zero gate or a unit weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = max(float(p.std()) if p.numel() > 1 else 0.0, 0.1)
            if p.ndim == 2 and min(p.shape) >= 64:
                scale = 1 / p.shape[1] ** 0.5
            p.copy_(p + scale * torch.randn(p.shape, generator=g))


def compare(record_module, preset: Path, tokens: torch.Tensor, seq_len: int, seed: int,
            as_trained: bool = False) -> list[dict]:
    """Logits and NLL of both models over one packed row, loops off and on. `as_trained`: the record's model cast as
    its train_model casts it (to bf16, then everything but the embedding back to float32: its RoPE frequencies, a
    buffer, stay rounded to bf16), then run in float32, beside the preset's model (model.rope_freq_dtype as set there);
    else both in float32, pgolf's frequencies too."""
    h = record_module.Hyperparameters()
    rec = record_module.GPT(h)
    randomize(rec, seed)
    if as_trained:
        rec = cast_as_trained(record_module, rec)
    rec = rec.float().eval()
    params = load_params(preset)
    model_cfg = params.model if as_trained else replace(params.model, rope_freq_dtype="float32")
    pg = GPT(model_cfg).eval()
    mapped = record_to_pgolf(rec.state_dict(), params.model.layers, params.model.parallel_from)
    missing, unexpected = pg.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise SystemExit(f"the record's parameters do not map onto pgolf's: missing {missing}, unexpected {unexpected}")
    idx, targets = tokens[None, :-1], tokens[None, 1:]
    cu = _cu_seqlens(idx, params.model.bos_id, seq_len)
    mask = document_mask(idx, params.model.bos_id, backend="varlen", max_len=seq_len)
    rows = []
    for loops in (False, True):
        rec.looping_active = loops
        pg.passes = pg.max_passes if loops else 0
        with torch.no_grad():
            a = rec.forward_logits(idx, cu_seqlens=cu, max_seqlen=seq_len).float()
            b = pg.logits(idx, doc_mask=mask)
        nll = [F.cross_entropy(x[0], targets[0]).item() for x in (a, b)]
        rows.append({"record_cast": "as trained" if as_trained else "float32", "loops": loops, "max_abs_logit_diff": (a - b).abs().max().item(),
                     "logit_scale": a.abs().max().item(), "nll_record": nll[0], "nll_pgolf": nll[1],
                     "nll_diff": nll[1] - nll[0], "tokens": targets.numel(), "stretches": cu.numel() - 1})
    return rows


def train_step_rows(record_module, preset: Path, tokens: torch.Tensor, seq_len: int, seed: int) -> list[dict]:
    """One training step of each trainer from the record's initial weights (its own draw from `seed`, cast as its
    trainer casts it) on one packed row of train tokens: the record's loss, backward, clip and its three optimizers
    (tied-embedding AdamW, Muon on the banks, scalar AdamW) beside pgolf's model, clip and build_optimizers at the
    preset's settings, both at step 0 of their schedules (LR scale 1, Muon momentum at its warm-up start). On the host,
    both forwards in float32 (the record's bf16 embedding table would run its whole forward in bf16 here), Muon's state
    and Newton-Schulz in bf16 on both sides, as on a GPU. A row per parameter: the relative difference of the gradients
    and of the updates (pgolf's against the record's)."""
    from pgolf import optim
    from pgolf.optim import apply_schedule, build_optimizers, muon_momentum

    params = load_params(preset)
    cfg, layers, lanes_from = params.train, params.model.layers, params.model.parallel_from
    rec = record_initial_model(record_module, seed)
    rec.tok_emb.float()
    rec.fused_ce_enabled = False  # its Triton kernels (loss, MLP): the eager paths compute the same
    for block in rec.blocks:
        block.mlp.use_fused = False
    h = record_module.Hyperparameters()
    pg = GPT(params.model)
    pg.load_state_dict(record_to_pgolf(rec.state_dict(), layers, lanes_from))
    rec.looping_active, pg.passes = False, 0  # step 0: the loops switch on at 35 %
    record_module.zeropower_via_newtonschulz5 = record_module.zeropower_via_newtonschulz5._torchdynamo_orig_callable
    torch.cuda.Stream = lambda *a, **k: None  # its Optimizers makes a side stream; its three steps are taken here
    rec_opt = record_module.Optimizers(h, rec)
    for group in rec_opt.optimizer_muon.param_groups:
        group["momentum"] = h.muon_momentum_warmup_start
    pg_opts = build_optimizers(pg, cfg)
    optim.NS_DTYPES["cpu"] = torch.bfloat16  # the record's Newton-Schulz is bf16 anywhere
    apply_schedule(pg_opts, 1.0, muon_momentum(0, cfg))
    idx, targets = tokens[None, :-1], tokens[None, 1:]
    rec(idx, targets, cu_seqlens=_cu_seqlens(idx, params.model.bos_id, seq_len), max_seqlen=seq_len).backward()
    pg(idx, targets, document_mask(idx, params.model.bos_id, backend="varlen", max_len=seq_len)).backward()
    rec_grads = record_to_pgolf({n: q.grad.detach().float().clone() for n, q in rec.named_parameters()}, layers,
                                lanes_from)
    before = {n: q.detach().float().clone() for n, q in pg.named_parameters()}
    pg_grads = {n: q.grad.detach().float().clone() for n, q in pg.named_parameters()}
    torch.nn.utils.clip_grad_norm_(list(rec.parameters()), h.grad_clip_norm)
    for opt in (rec_opt.optimizer_tok, rec_opt.optimizer_scalar, rec_opt.optimizer_muon):
        opt.step()
    torch.nn.utils.clip_grad_norm_(list(pg.parameters()), cfg.grad_clip)
    for opt in pg_opts:
        opt.step()
    rec_after = record_to_pgolf({n: q.detach().float() for n, q in rec.named_parameters()}, layers, lanes_from)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    muon = {id(q) for o in pg_opts if isinstance(o, optim.Muon) for group in o.param_groups for q in group["params"]}
    rows = []
    for n, q in pg.named_parameters():
        u_rec, u_pg = rec_after[n] - before[n], q.detach().float() - before[n]
        rows.append({"param": n, "optimizer": "Muon" if id(q) in muon else "AdamW",
                     "grad_rel_diff": rel(pg_grads[n], rec_grads[n]), "update_rel_diff": rel(u_pg, u_rec),
                     "grad_norm_record": float(rec_grads[n].norm()), "update_norm_record": float(u_rec.norm()),
                     "update_norm_pgolf": float(u_pg.norm())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", type=Path, required=True, help="the record's train_gpt.py")
    ap.add_argument("--mirror", type=Path, required=True, help="a CaseOps mirror (pgolf mirror --caseops)")
    ap.add_argument("--preset", type=Path, default=ROOT / "presets" / "record.yaml")
    ap.add_argument("--tokens", type=int, default=1024, help="val tokens in the packed row")
    ap.add_argument("--seq-len", type=int, default=256, help="stretches cut every this many tokens of a document")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-step", type=int, metavar="TOKENS", default=0,
                    help="also one training step of both trainers from the record's init (its draw from 42) on this "
                         "many train tokens in one row cut every 2048 tokens of a document (train_step_rows)")
    ap.add_argument("--out", type=Path, default=Path("record_equivalence.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    data, _ = dataset(args.mirror)
    params = load_params(args.preset)
    val = load_val(data, params.model.vocab_size)
    record, tokens = load_record(args.record), val.tokens[:args.tokens + 1].long()
    rows = [r for cast in (False, True) for r in compare(record, args.preset, tokens, args.seq_len, args.seed, cast)]
    print("| the record's weights | loops | max abs logit diff | max abs logit | NLL record | NLL pgolf | diff |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['record_cast']} | {'on' if r['loops'] else 'off'} | {r['max_abs_logit_diff']:.2e} | {r['logit_scale']:.2f} | "
              f"{r['nll_record']:.6f} | {r['nll_pgolf']:.6f} | {r['nll_diff']:+.2e} |")
    print(f"{rows[0]['tokens']} val targets in one row, {rows[0]['stretches']} stretches (cut at BOS and every "
          f"{args.seq_len} tokens of a document); float32 on {torch.device('cpu')}, random weights (seed {args.seed})")
    step_rows = []
    if args.train_step:
        from pgolf.data import read_shard, shard_paths

        train = torch.from_numpy(read_shard(shard_paths(data, "train")[0])[:args.train_step + 1].astype("int64"))
        step_rows = train_step_rows(record, args.preset, train, 2048, 42)
        print("\none training step from the record's init, pgolf's against the record's (relative difference)\n"
              "| parameters | count | max gradient diff | max update diff | update norm, pgolf / record |\n"
              "|---|---|---|---|---|")
        for kind in ("AdamW", "Muon"):
            sel = [r for r in step_rows if r["optimizer"] == kind and r["update_norm_record"] > 0]
            norms = sum(r["update_norm_pgolf"] for r in sel) / sum(r["update_norm_record"] for r in sel)
            print(f"| {kind} | {len(sel)} | {max(r['grad_rel_diff'] for r in sel if r['grad_norm_record'] > 0):.1e} | "
                  f"{max(r['update_rel_diff'] for r in sel):.1e} | {norms:.5f} |")
    args.out.write_text(json.dumps({"record_script": str(args.record), "seq_len": args.seq_len, "rows": rows,
                                    "train_step_rows": step_rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
