"""The params.yaml schema: one dataclass per section, checked as a whole when it loads.

Every field declares its type and, where it has one, its range or the registry holding its valid
names. `load_params` refuses unknown keys, wrong types, out-of-range numbers, unknown choices and
inconsistent combinations with one line naming the param. Stages call it; library code takes the
dataclasses and never reads params.yaml.
"""

import dataclasses
import difflib
import importlib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PgolfError

MIN_SHARD_TOKENS = 256  # smaller shards are a typo: millions of files
NPROC = r"gpu|[1-9][0-9]*"  # gpu = every visible GPU (1 process without one), or a number of processes


def param(default: Any = dataclasses.MISSING, *, factory: Any = None, ge: float | None = None,
          gt: float | None = None, le: float | None = None, choices: str | None = None,
          also: tuple[str, ...] = (), pattern: str | None = None) -> Any:
    """A field with its checks: bounds (ge, gt, le), `choices` = "module:REGISTRY" whose names are the valid
    values (plus `also`), or a regex `pattern` for strings."""
    rules = {k: v for k, v in dict(ge=ge, gt=gt, le=le, choices=choices, also=also, pattern=pattern).items()
             if v is not None and v != ()}
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class DataConfig:
    source: str = param("builtin", choices="pgolf.corpus:SOURCES")
    paths: list[str] = param(factory=list)  # jsonl: files or folders of *.jsonl, *.jsonl.zst, *.txt
    tokenizer: str | None = None  # jsonl/builtin: a SentencePiece model to use; None trains one
    vocab_size: int = param(1024, ge=260)  # size of a tokenizer trained here (byte fallback needs 256 + 4)
    tokenizer_train_chars: int = param(200_000_000, ge=1)  # cap on text fed to the tokenizer trainer
    val_docs: int = param(50_000, ge=1)  # the first N documents are the validation split
    shard_tokens: int = param(100_000_000, ge=MIN_SHARD_TOKENS)
    caseops: bool = False  # lossless case transform (jsonl/builtin: applied here; fineweb: a CaseOps export's
    # shards with their val_bytes sidecars); the tokenizer must hold the case operators; bpb on the original bytes
    fineweb_repo: str = "willdepueoai/parameter-golf"
    fineweb_variant: str = param("sp1024", pattern=r"sp[0-9]+(_[a-z0-9_]+)?|byte260")
    fineweb_mirror: str | None = None  # a local folder laid out like the Hub repo
    train_shards: int = param(80, ge=1)
    download_dir: str | None = None  # None: the Hugging Face cache


@dataclass
class ModelConfig:
    vocab_size: int = param(1024, ge=2)
    bos_id: int = param(1, ge=0)  # the tokenizer's BOS id (documents start with it)
    layers: int = param(9, ge=1)
    dim: int = param(512, ge=2)
    heads: int = param(8, ge=1)
    kv_heads: int = param(4, ge=1)
    mlp_mult: float = param(2.0, gt=0)
    activation: str = param("relu2", choices="pgolf.model:ACTIVATIONS")
    leaky_slope: float = param(0.5, ge=0)
    tied_embed: bool = True
    embed_init_std: float = param(0.005, ge=0)
    ortho_init: bool = False  # orthogonal init of the hidden matrices (output projections stay zero)
    rope_base: float = param(10000.0, gt=0)
    rope_dims: int = param(0, ge=0)  # rotate the first k dims of each head; 0 = all
    rope_freq_dtype: str = param("float32", choices="pgolf.model:ROPE_FREQ_DTYPES")  # the frequencies' precision
    qk_norm: bool = True
    qk_gain_init: float = 1.5
    logit_softcap: float = param(30.0, ge=0)  # 0 = off
    xsa_last: int = param(0, ge=0)  # exclusive self attention on the last k layers
    ln_scale: bool = False  # block norms scaled by 1/sqrt(layer+1)
    unet_skips: bool = False
    skip_gates: bool = False  # U-Net skips blended in through a learned sigmoid gate (needs unet_skips)
    smear_gate: str = param("off", choices="pgolf.model:SMEAR_GATES")
    gate_window: int = param(12, ge=1)  # input dims the sparse attention gate and the bos smear gate read
    sparse_gate: bool = False  # SparseAttnGate: sigmoid gate per head from the first gate_window dims
    sparse_gate_scale: float = param(1.0, gt=0)
    head_gate: bool = False  # dense sigmoid gate per attention head from the whole input
    bigram_buckets: int = param(0, ge=0)  # 0 = no BigramHash
    bigram_dim: int = param(128, ge=1)
    ve_last: int = param(0, ge=0)  # value embeddings re-injected in the last k layers
    ve_dim: int = param(128, ge=1)
    recur_start: int = param(-1, ge=-1)  # depth recurrence: layers [recur_start, recur_end] run again; -1 = off
    recur_end: int = param(-1, ge=-1)
    recur_loops: int = param(1, ge=1)  # extra passes over the looped layers
    recur_after: float = param(0.5, ge=0, le=1)  # training fraction at which the first extra pass starts ...
    recur_stagger: float = param(0.0, ge=0, le=1)  # ... and each further one this much later (progressive)
    parallel_from: int = param(-1, ge=-1)  # parallel residuals from this layer on; -1 = off
    parallel_lanes: int = param(1, ge=1, le=2)  # 1: x + attn(h) + mlp(h); 2: the record's two lanes, mixed by weights


@dataclass
class TrainConfig:
    seq_len: int = param(1024, ge=1)
    batch_tokens: int = param(524_288, ge=1)  # global, per optimizer step
    micro_batch_tokens: int = param(65_536, ge=1)  # per rank, per forward
    iterations: int = param(20_000, ge=1)
    max_seconds: float = param(600.0, ge=0)  # wallclock cap on training; 0 = none (schedule keyed to steps)
    calibration_reserve_s: float = param(0.0, ge=0)  # cap seconds kept for calibration on training data
    warmup_steps: int = param(20, ge=0)
    warmdown_frac: float = param(0.5, ge=0, le=1)  # last fraction of the run decays the LR ...
    lr_floor: float = param(0.0, ge=0, le=1)  # ... never below this fraction of its peak
    matrix_lr: float = param(0.04, ge=0)
    embed_lr: float = param(0.05, ge=0)
    head_lr: float = param(0.008, ge=0)
    scalar_lr: float = param(0.04, ge=0)
    adam_beta2: float = param(0.95, gt=0, le=1)
    muon_momentum: float = param(0.95, ge=0, le=1)
    muon_momentum_start: float = param(0.85, ge=0, le=1)
    muon_momentum_warmup_steps: int = param(500, ge=0)
    muon_wd: float = param(0.0, ge=0)
    muon_row_norm: bool = False  # MuonEq-R
    muon_dtype: str = param("float32", choices="pgolf.optim:MUON_DTYPES")  # momentum buffers and the grads into them
    ns_steps: int = param(5, ge=1)
    ns_coeffs: str = param("quintic", choices="pgolf.optim:NS_COEFFS")
    adam_wd: float = param(0.0, ge=0)  # scalars, gates and the untied head
    embed_wd: float = param(0.0, ge=0)  # embedding tables
    grad_clip: float = param(0.0, ge=0)  # 0 = off
    grad_clip_scope: str = param("global", choices="pgolf.train:GRAD_CLIP_SCOPES")  # rank: each rank's, pre-average
    ema_decay: float = param(0.997, ge=0, le=1)
    swa: bool = False
    swa_threshold: float = param(0.2, ge=0, le=1)  # average every swa_every steps once the warmdown factor is below this
    swa_every: int = param(50, ge=1)
    qat_threshold: float = param(0.0, ge=0, le=1)  # fake-quantize once the warmdown factor is below this; 0 = off
    qat_bits: int = param(6, ge=2, le=8)
    fp8: bool = False  # the blocks' projections through FP8 matmuls (e4m3, e5m2 gradients, a scale per tensor per call)
    compile: bool = True
    compile_mode: str = param("default", choices="pgolf.train:COMPILE_MODES")  # cuda_graphs: the step replayed
    compile_warmup_steps: int = param(20, ge=0)
    seed: int = param(1337, ge=0, le=2**32 - 1)
    nproc_per_node: str = param("gpu", pattern=NPROC)
    log_every: int = param(50, ge=1)
    val_every: int = param(0, ge=0)  # periodic val bpb every N steps (and at the end); 0 = off
    val_tokens: int = param(1_048_576, ge=1)  # cap on tokens for periodic val
    doc_mask: bool = False  # attention stays inside each document (a new one at every BOS)
    pack: str = param("rows", choices="pgolf.train:PACKINGS")  # span: a rank's micro-batch as one row (needs doc_mask)
    embed_dtype: str = param("float32", choices="pgolf.train:EMBED_DTYPES")  # the token embedding's storage in training
    checkpoint_every_s: float = param(120.0, ge=0)  # resumable checkpoint period; 0 = off


@dataclass
class EmaConfig:
    source: str = param("ema", choices="pgolf.weights:SOURCES")
    eval_seq_len: int = param(1024, ge=1)
    eval_batch_seqs: int = param(32, ge=1)


@dataclass
class CalibrateConfig:
    source: str = param("train", choices="pgolf.calibrate:SOURCES")
    sampling: str = param("stream", choices="pgolf.calibrate:SAMPLINGS")  # train: the stream's start, or random windows
    num_seqs: int = param(64, ge=1)
    seq_len: int = param(2048, ge=1)
    batch_seqs: int = param(8, ge=1)
    temperature: float = param(0.8, gt=0)
    seed: int = param(0, ge=0, le=2**32 - 1)


@dataclass
class GroupValues:
    attn: float = 6
    mlp: float = 6
    embed: float = 8
    other: float = 8


@dataclass
class QuantConfig:
    method: str = param("gptq", choices="pgolf.quant:METHODS")
    bits: GroupValues = param(factory=GroupValues)
    clip_rule: str = param("sdclip", choices="pgolf.quant:CLIP_RULES")  # gptq's per-row scales
    clip_percentiles: list[float] = param(factory=lambda: [1.0, 0.999, 0.995, 0.99, 0.98])
    sdclip_k: GroupValues = param(factory=lambda: GroupValues(13.0, 12.0, 15.0, 12.85))  # clip = k * std(row)
    adaptive_alpha: float = param(0.5, ge=0)  # adaptive_clip: how strongly sensitivity tightens the clip
    damp: float = param(0.01, gt=0)  # fraction of mean(diag H) added to the diagonal
    block_size: int = param(128, ge=1)
    act_order: bool = True
    lqer_rank: int = param(0, ge=0)  # low-rank error correction rank; 0 = off
    lqer_tensors: int = param(3, ge=1)  # ... on this many tensors, those whose weighted error it cuts most
    target_bytes: int | str | None = param("auto", ge=1, also=("auto",))  # model bytes to fit; auto: the limit
    target_margin: int = param(2000, ge=0)  # auto: bytes kept under limit - code
    keep_float_numel: int = param(65_536, ge=1)  # tensors smaller than this (and all 1-D ones) stay fp16


@dataclass
class CompressConfig:
    codec: str = param("auto", choices="pgolf.codecs:CODECS", also=("auto",))
    layout: str = param("auto", choices="pgolf.layouts:LAYOUTS", also=("auto",))
    auto_slack_bytes: int = param(0, ge=0)  # auto takes a faster-decoding codec per stream within this many bytes
    streams: str = param("group", choices="pgolf.pack:STREAMINGS")  # code streams per group or per matrix type
    reorder: str = param("none", choices="pgolf.reorder:REORDERS")  # function-preserving unit orders before quantizing


@dataclass
class TTTConfig:
    chunk_tokens: int = param(32_768, ge=1)  # ttt: targets scored, then adapted on, per chunk
    epochs: int = param(1, ge=1)
    optimizer: str = param("sgd", choices="pgolf.ttt:OPTIMIZERS")
    lr: float = param(0.002, ge=0)
    momentum: float = param(0.9, ge=0, le=1)
    cosine: bool = True  # lr follows a cosine over the chunks
    grad_clip: float = param(1.0, ge=0)  # 0 = off
    params: str = param("all", choices="pgolf.ttt:PARAM_SETS")
    last_blocks: int = param(2, ge=1)  # params: last_blocks adapts this many final blocks
    batch_seqs: int = param(32, ge=1)
    phases: int = param(3, ge=1)  # phased_ttt: the prefix is scored and adapted on in this many phases
    prefix_docs: int = param(2000, ge=1)  # phased_ttt: documents in the prefix
    # lora_ttt: chunk_tokens targets a chunk (the record: 48), a LoRA per document on these modules
    lora_targets: list[str] = param(factory=lambda: ["q", "k", "v", "o", "mlp", "head"], choices="pgolf.lora:TARGETS")
    lora_rank: int = param(80, ge=1)
    lora_alpha: float = param(144.0, gt=0)  # the delta is scaled by alpha / rank
    grad_steps: int = param(1, ge=1)  # Adam steps on each chunk once it is scored
    betas: list[float] = param(factory=lambda: [0.0, 0.999], ge=0, le=1)
    weight_decay: float = param(0.0, ge=0)
    batch_docs: int = param(64, ge=1)  # documents adapted at once, longest first
    seed: int = param(0, ge=0)  # the LoRAs' A draws (at the start and after each global phase)
    # lora_ttt's phased global SGD (0 = off): the base model on the prefix_docs longest documents, in `phases` parts
    global_lr: float = param(0.0, ge=0)
    global_chunk_tokens: int = param(32_768, ge=1)  # one SGD step per this many scored prefix tokens
    compile: bool = False  # lora_ttt: the model's forward compiled once, dynamic in documents and window length
    # cuda_graphs: steps replayed; regional: each block compiled on its own (a block's compile, not the network's)
    compile_mode: str = param("default", choices="pgolf.lora:COMPILE_MODES")


@dataclass
class EvalConfig:
    mode: str = param("sliding", choices="pgolf.evaluate:MODES")
    seq_len: int = param(1024, ge=1)
    stride: int = param(0, ge=0)  # sliding window stride; 0 = non-overlapping windows
    batch_seqs: int = param(32, ge=1)
    temperature: float = param(1.0, gt=0)
    doc_mask: bool = False  # each target sees only its own document's tokens (from its BOS) in the window
    nproc_per_node: str = param("gpu", pattern=NPROC)
    ttt: TTTConfig = param(factory=TTTConfig)


@dataclass
class AuditConfig:
    limit_bytes: int = param(16_000_000, ge=1)
    train_budget_s: float = param(600.0, gt=0)
    eval_budget_s: float = param(600.0, gt=0)
    strict: bool = True


@dataclass
class ExportConfig:
    # their lengths are bounded: the fit reserves room for the longest (export.widest), so no text breaks it
    name: str = param("pgolf run", pattern=r"(?s).{1,200}")
    author: str = param("<your name>", pattern=r"(?s).{1,100}")
    github_id: str = param("<your github id>", pattern=r"(?s).{1,39}")


@dataclass
class Params:
    data: DataConfig = param(factory=DataConfig)
    model: ModelConfig = param(factory=ModelConfig)
    train: TrainConfig = param(factory=TrainConfig)
    ema: EmaConfig = param(factory=EmaConfig)
    calibrate: CalibrateConfig = param(factory=CalibrateConfig)
    quant: QuantConfig = param(factory=QuantConfig)
    compress: CompressConfig = param(factory=CompressConfig)
    eval: EvalConfig = param(factory=EvalConfig)
    audit: AuditConfig = param(factory=AuditConfig)
    export: ExportConfig = param(factory=ExportConfig)


# ----------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, rules: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value in rules.get("also", ()):
            return value
        (inner,) = [a for a in args if a not in (type(None), str)] or [str]
        return _coerce(value, inner, where, rules)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PgolfError(f"{where}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return build(tp, value, where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise PgolfError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]", {}) for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, str)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, bool) and type(value) is tp:
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    raise PgolfError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type, raw: dict, where: str = "") -> Any:
    """Make a `cls` from a mapping, naming the closest valid key for an unknown one."""
    prefix = f"{where}." if where else ""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(sorted(fields))}"
            raise PgolfError(f"unknown param '{prefix}{key}'; {hint}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{prefix}{k}", dict(fields[k].metadata)) for k, v in raw.items()})


# ----------------------------------------------------------------------------- checks

def _registry(ref: str):
    # Looked up by name at load time, not imported at the top: a registry decides whether params are
    # accepted, never what a stage writes, so it is not a code dependency of every stage.
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _check_field(value: Any, rules: dict, key: str, choices: bool = True) -> None:
    if isinstance(value, list):  # a list's rule holds for each item
        for i, item in enumerate(value):
            _check_field(item, rules, f"{key}[{i}]", choices)
        return
    if value is None or (isinstance(value, str) and value in rules.get("also", ())):
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise PgolfError(f"{key}: {value}; expected a finite number")
        for rule, ok, text in (("ge", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"),
                               ("le", lambda b: value <= b, "<=")):
            if rule in rules and not ok(rules[rule]):
                raise PgolfError(f"{key}: {value}; expected {text} {rules[rule]}")
    if isinstance(value, str):
        if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
            raise PgolfError(f"{key}: {value!r}; expected a value matching {rules['pattern']}")
        if choices and "choices" in rules:
            registry = _registry(rules["choices"])
            if value not in registry:
                valid = [*rules.get("also", ()), *registry]
                raise PgolfError(f"{key}: {value!r}; expected one of {', '.join(valid)}")


def check_fields(obj: Any, where: str = "", skip: tuple[str, ...] = (), choices: bool = True) -> None:
    """Every field's own rule (range, choice, pattern), recursively; `skip` names top-level sections to leave,
    `choices=False` leaves the registry lookups out."""
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value, key = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, key, choices=choices)
        else:
            _check_field(value, dict(f.metadata), key, choices)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise PgolfError(message)


def check_combinations(p: Params) -> None:
    """Rules that tie several params together."""
    m, t, e, q = p.model, p.train, p.eval, p.quant
    _require(m.dim % m.heads == 0, f"model.heads: {m.heads} does not divide model.dim {m.dim}")
    _require(m.heads % m.kv_heads == 0, f"model.kv_heads: {m.kv_heads} does not divide model.heads {m.heads}")
    head_dim = m.dim // m.heads
    _require(head_dim % 2 == 0, f"model.dim / model.heads = {head_dim}: RoPE needs an even head dim")
    _require(m.rope_dims <= head_dim and m.rope_dims % 2 == 0,
             f"model.rope_dims: {m.rope_dims}; expected an even number <= the head dim {head_dim}")
    _require(m.vocab_size <= 1 << 16, f"model.vocab_size: {m.vocab_size}; shards hold uint16 ids (<= 65536)")
    _require(m.xsa_last <= m.layers, f"model.xsa_last: {m.xsa_last} > model.layers {m.layers}")
    _require(m.ve_last <= m.layers, f"model.ve_last: {m.ve_last} > model.layers {m.layers}")
    _require(m.bigram_buckets != 1, "model.bigram_buckets: 1; expected 0 (off) or at least 2")
    _require(m.parallel_from < m.layers, f"model.parallel_from: {m.parallel_from} >= model.layers {m.layers}")
    _require(m.parallel_lanes == 1 or m.parallel_from >= 0, "model.parallel_lanes: 2 needs model.parallel_from >= 0")
    _require(m.parallel_lanes == 1 or m.recur_start < 0 or m.recur_end < m.parallel_from,
             f"model.parallel_lanes: 2 needs the looped layers before the lanes (recur_end {m.recur_end} < "
             f"parallel_from {m.parallel_from})")
    _require(not (m.head_gate and m.sparse_gate), "model.head_gate and model.sparse_gate: choose one attention gate")
    _require(not m.skip_gates or m.unet_skips, "model.skip_gates: true needs model.unet_skips: true")
    _require(m.gate_window <= m.dim, f"model.gate_window: {m.gate_window} > model.dim {m.dim}")
    if m.recur_start >= 0 or m.recur_end >= 0:
        _require(0 <= m.recur_start <= m.recur_end < m.layers,
                 f"model.recur_start/recur_end: {m.recur_start}..{m.recur_end}; expected 0 <= start <= end < "
                 f"model.layers {m.layers}, or both -1")
    _require(t.micro_batch_tokens % t.seq_len == 0,
             f"train.micro_batch_tokens: {t.micro_batch_tokens} is not a multiple of train.seq_len {t.seq_len}")
    _require(t.pack == "rows" or t.doc_mask, f"train.pack: {t.pack} needs train.doc_mask: true (one row of "
             f"{t.micro_batch_tokens} tokens would attend across all of them)")
    _require(t.batch_tokens % t.micro_batch_tokens == 0,
             f"train.batch_tokens: {t.batch_tokens} is not a multiple of train.micro_batch_tokens {t.micro_batch_tokens}")
    _require(t.max_seconds == 0 or t.calibration_reserve_s < t.max_seconds,
             f"train.calibration_reserve_s: {t.calibration_reserve_s} leaves no training time under "
             f"train.max_seconds {t.max_seconds}")
    _require(t.max_seconds <= p.audit.train_budget_s,
             f"train.max_seconds: {t.max_seconds} > audit.train_budget_s {p.audit.train_budget_s}: the audit would "
             f"fail the run after training")
    _require(e.stride <= e.seq_len, f"eval.stride: {e.stride} > eval.seq_len {e.seq_len}")
    _require(len(e.ttt.betas) == 2, f"eval.ttt.betas: {e.ttt.betas}; expected two numbers in [0, 1] (Adam's beta1, beta2)")
    _require(bool(e.ttt.lora_targets) or e.mode != "lora_ttt",
             "eval.ttt.lora_targets: empty; lora_ttt needs at least one of q, k, v, o, mlp, head")
    _require(bool(q.clip_percentiles) and all(0 < c <= 1 for c in q.clip_percentiles),
             f"quant.clip_percentiles: {q.clip_percentiles}; expected a non-empty list of fractions in (0, 1]")
    for g in ("attn", "mlp", "embed", "other"):
        b = getattr(q.bits, g)
        _require(b == int(b) and 2 <= b <= 8, f"quant.bits.{g}: {b}; expected an integer from 2 to 8")
        _require(getattr(q.sdclip_k, g) > 0, f"quant.sdclip_k.{g}: {getattr(q.sdclip_k, g)}; expected > 0")


def model_budget(params: Params, code_bytes: int) -> int | None:
    """quant.target_bytes resolved: `auto` = audit.limit_bytes - code bytes - quant.target_margin."""
    t = params.quant.target_bytes
    return params.audit.limit_bytes - code_bytes - params.quant.target_margin if t == "auto" else t


def find_key(key: str) -> None:
    """Refuse a dotted key that names no param, with the closest one (DVC's own error for `-S` gives none)."""
    cls, where = Params, ""
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            raise PgolfError(f"unknown param '{key}': '{where}' holds a value, not keys")
        if part not in {f.name for f in dataclasses.fields(cls)}:
            build(cls, {part: None}, where)  # raises the unknown-param line with the closest key
        cls, where = typing.get_type_hints(cls)[part], f"{where}.{part}" if where else part


def load_params(path: str | Path = "params.yaml", choices: bool = True) -> Params:
    """Parse and check params.yaml; any problem is one PgolfError line naming the file and the param.
    `choices=False` skips the registry lookups, which import the registries' modules (torch and triton, seconds
    on a GPU host): for stages that use no registry (audit, export), run after the check stage has looked them up."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PgolfError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise PgolfError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise PgolfError(f"{path}: not valid YAML (not UTF-8 text)") from None
    if not isinstance(raw, dict):
        raise PgolfError(f"{path}: expected a mapping of sections")
    try:
        params = build(Params, raw)
        check_fields(params, choices=choices)
        check_combinations(params)
    except PgolfError as e:
        raise PgolfError(f"{path}: {e}") from None
    return params
