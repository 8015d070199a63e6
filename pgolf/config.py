"""The params.yaml schema: one dataclass per section, strict parsing with one-line errors.

Stage scripts call `load_params`; library code takes the dataclasses and never reads params.yaml.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PgolfError


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin | jsonl | fineweb
    paths: list[str] = field(default_factory=list)  # jsonl: files or folders of *.jsonl, *.jsonl.zst, *.txt
    tokenizer: str | None = None  # jsonl/builtin: a SentencePiece model to use; None trains one
    vocab_size: int = 1024  # size of a tokenizer trained here
    tokenizer_train_chars: int = 200_000_000  # cap on training text fed to the tokenizer trainer
    val_docs: int = 50_000  # the first N documents are the validation split
    shard_tokens: int = 100_000_000
    fineweb_repo: str = "willdepueoai/parameter-golf"
    fineweb_variant: str = "sp1024"
    fineweb_mirror: str | None = None  # a local folder laid out like the Hub repo
    train_shards: int = 80
    download_dir: str = "~/.cache/pgolf/fineweb"  # where Hub downloads land (resumable), outside the repo


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    layers: int = 9
    dim: int = 512
    heads: int = 8
    kv_heads: int = 4
    mlp_mult: float = 2.0
    activation: str = "relu2"  # relu2 | leaky_relu2
    leaky_slope: float = 0.5
    tied_embed: bool = True
    embed_init_std: float = 0.005
    rope_base: float = 10000.0
    rope_dims: int = 0  # rotate the first k dims of each head; 0 = all
    qk_norm: bool = True
    qk_gain_init: float = 1.5
    logit_softcap: float = 30.0  # 0 = off
    xsa_last: int = 0  # exclusive self attention on the last k layers
    ln_scale: bool = False  # block norms scaled by 1/sqrt(layer+1)
    unet_skips: bool = False
    smear_gate: bool = False
    bigram_buckets: int = 0  # 0 = no BigramHash
    bigram_dim: int = 128
    ve_last: int = 0  # value embeddings re-injected in the last k layers
    ve_dim: int = 128
    recur_start: int = -1  # depth recurrence: re-run layers [recur_start, recur_end]; -1 = off
    recur_end: int = -1
    recur_after: float = 0.5  # ... once this fraction of training has passed
    parallel_from: int = -1  # parallel residuals from this layer on; -1 = off
    head_gate: bool = False  # sigmoid gate per attention head


@dataclass
class TrainConfig:
    seq_len: int = 1024
    batch_tokens: int = 524_288  # global, per optimizer step
    micro_batch_tokens: int = 65_536  # per rank, per forward
    iterations: int = 20_000
    max_seconds: float = 600.0  # wallclock cap on training; 0 = none (schedule keyed to steps)
    warmup_steps: int = 20
    warmdown_frac: float = 0.5  # last fraction of the run decays the LR ...
    lr_floor: float = 0.0  # ... to this fraction of its peak
    matrix_lr: float = 0.04
    embed_lr: float = 0.05
    head_lr: float = 0.008
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_wd: float = 0.0
    muon_row_norm: bool = False  # MuonEq-R
    ns_steps: int = 5
    adam_wd: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    ema_decay: float = 0.997
    swa: bool = False
    swa_threshold: float = 0.2  # average every swa_every steps once the LR scale is below this
    swa_every: int = 50
    qat_threshold: float = 0.0  # fake-quantize weights once the LR scale is below this; 0 = off
    qat_bits: int = 6
    compile: bool = True
    compile_warmup_steps: int = 20
    seed: int = 1337
    nproc_per_node: str = "gpu"  # gpu = all visible GPUs (1 process without one), or a number
    log_every: int = 50
    val_every: int = 0  # periodic val bpb every N steps; 0 = off
    val_tokens: int = 1_048_576  # cap on tokens for periodic val
    checkpoint_every_s: float = 120.0  # resumable checkpoint period; 0 = off


@dataclass
class EmaConfig:
    source: str = "ema"  # ema | swa | raw
    eval_seq_len: int = 1024
    eval_batch_seqs: int = 32


@dataclass
class CalibrateConfig:
    source: str = "train"  # train | self
    num_seqs: int = 64
    seq_len: int = 2048
    batch_seqs: int = 8
    temperature: float = 0.8
    seed: int = 0


@dataclass
class GroupValues:
    attn: float = 6
    mlp: float = 6
    embed: float = 8
    other: float = 8


@dataclass
class QuantConfig:
    method: str = "gptq"  # rtn | clip_search | sdclip | gptq | adaptive_clip
    bits: GroupValues = field(default_factory=GroupValues)
    clip_rule: str = "clip_search"  # how gptq picks its per-row scales: rtn | clip_search | sdclip
    clip_percentiles: list[float] = field(default_factory=lambda: [1.0, 0.999, 0.995, 0.99, 0.98])
    sdclip_k: GroupValues = field(default_factory=lambda: GroupValues(4.0, 4.0, 6.0, 6.0))
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128
    act_order: bool = True
    adaptive_alpha: float = 0.5  # adaptive_clip: how strongly sensitivity widens the clip
    target_bytes: int | None = None  # adaptive_clip / prune: compressed model size to meet
    prune: bool = False  # selective +-1 pruning down to target_bytes
    keep_float_numel: int = 65_536  # tensors smaller than this (and all 1-D ones) stay fp16


@dataclass
class CompressConfig:
    codec: str = "auto"  # zstd | brotli | lzma | auto
    layout: str = "auto"  # int8 | bitpack | auto


@dataclass
class TTTConfig:
    enabled: bool = False
    chunk_tokens: int = 32_768
    epochs: int = 1
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.002
    params: str = "all"  # all | norms | mlp


@dataclass
class EvalConfig:
    seq_len: int = 1024
    stride: int = 0  # sliding window stride; 0 = non-overlapping windows
    batch_seqs: int = 32
    temperature: float = 1.0
    nproc_per_node: str = "gpu"
    ttt: TTTConfig = field(default_factory=TTTConfig)


@dataclass
class AuditConfig:
    limit_bytes: int = 16_000_000
    train_budget_s: float = 600.0
    eval_budget_s: float = 600.0
    strict: bool = True


@dataclass
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PgolfError(f"{where}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return build(tp, value, where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise PgolfError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
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
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(sorted(names))}"
            raise PgolfError(f"unknown param '{prefix}{key}'; {hint}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in raw.items()})


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PgolfError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise PgolfError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PgolfError(f"{path}: expected a mapping of sections")
    try:
        return build(Params, raw)
    except PgolfError as e:
        raise PgolfError(f"{path}: {e}") from None


def as_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
