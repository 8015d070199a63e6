"""Eval modes: how the blob is scored on the validation split. One function each, registered in MODES.

`sliding` scores overlapping windows (stride 0: non-overlapping); `ttt` and `phased_ttt` adapt the model on
targets after scoring them (ttt.py); `lora_ttt` scores each document with a LoRA of its own (lora.py). Each returns the score and a record, counted, of what test-time training
did, for the audit.
"""

import torch

from . import lora, ttt
from .config import EvalConfig
from .data import ValSplit
from .model import GPT
from .registry import Registry
from .score import Score, score

MODES: Registry = Registry("eval.mode")  # (model, val, cfg, device) -> (Score, record)


def sliding(model: GPT, val: ValSplit, cfg: EvalConfig, device: torch.device) -> tuple[Score, dict]:
    s = score(model, val, cfg.seq_len, cfg.stride, cfg.batch_seqs, cfg.temperature, device, progress=True,
              doc_mask=cfg.doc_mask)
    return s, {"ttt": "off", "val_tokens_trained_before_scored": 0, "ttt_tokens_adapted": 0}


MODES.add("sliding", sliding)
MODES.add("ttt", ttt.chunked_ttt)
MODES.add("phased_ttt", ttt.phased_ttt)
MODES.add("lora_ttt", lora.lora_ttt)


def evaluate(model: GPT, val: ValSplit, cfg: EvalConfig, device: torch.device) -> tuple[Score, dict]:
    """Score the split by `eval.mode`."""
    return MODES[cfg.mode](model, val, cfg, device)


def like_for_like(cfg: EvalConfig, plain_seq_len: int) -> bool:
    """Whether the eval score itself is on the plain windows the float model was scored on (the quant gap's)."""
    return (cfg.mode == "sliding" and cfg.stride in (0, cfg.seq_len) and cfg.seq_len == plain_seq_len
            and not cfg.doc_mask)
