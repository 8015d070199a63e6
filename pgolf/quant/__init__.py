"""Post-training quantization: symmetric int-k per-row codes, the records' clip rules, GPTQ, LQER, and
fitting the compressed model to a byte target.

Rate and distortion meet in the clip. A row's scale is clip / qmax; a wider clip puts the bulk of the
weights on fewer codes (fewer bytes after entropy coding) at the cost of coarser steps. SDClip sets
clip = k * std(row) with no cap at the row's absmax, so k is a rate knob; GPTQ spends the rounding error
where the Hessian says it costs least; adaptive clip (parameter-golf PR #1962) gives each tensor its own k from
its sensitivity; LQER adds a quantized low-rank correction of the error where it cuts the loss most.

The package by concept: `codes` (what quantization makes), `clips` (clip rules), `gptq`, `lqer`, `problem` (a
model's tensors and the methods), `fit` (the byte target) and `files` (the stage's inputs and output).
"""

from .clips import CLIP_RULES, clip_absmax, clip_sdclip, clip_search, least_error_k
from .codes import GROUPS, LowRank, Quantized, QuantResult, group_of, qmax, round_rows, weighted_error
from .files import load_inputs, load_quantized, save_quantized
from .fit import apply_pruning, fit_target, prune_candidates, quantize
from .gptq import gptq, gptq_many, prepare_hessian
from .problem import METHODS, Problem, adaptive_ks

__all__ = ["CLIP_RULES", "GROUPS", "METHODS", "LowRank", "Problem", "QuantResult", "Quantized", "adaptive_ks",
           "apply_pruning", "clip_absmax", "clip_sdclip", "clip_search", "fit_target", "gptq", "gptq_many",
           "group_of", "least_error_k", "load_inputs", "load_quantized", "prepare_hessian", "prune_candidates", "qmax",
           "quantize", "round_rows", "save_quantized", "weighted_error"]
