"""A stand-in for FlashAttention-3's `flash_attn_interface`, so a record's train_gpt.py runs unmodified where FA3 does
not install (bench/record_parity.py puts this folder and the repository on PYTHONPATH): `flash_attn_func` over SDPA,
`flash_attn_varlen_func` over FlexAttention with the document block mask pgolf trains with.

The varlen call is opaque to torch.compile, as FA3's kernels are: a custom op whose body builds the block mask from
cu_seqlens and runs a compiled FlexAttention outside the model's graph. Traced into the graph instead, the block mask
sent pgolf's training to NaN on an H200 (bench/NOTES.md, call 31), and every cu_seqlens bucket the record warms up
recompiled FlexAttention's kernels with the whole model. The op keeps FlexAttention's own autograd graph for the
backward (no recomputation): the forward stores it under a handle, the backward op pops it. The block mask is built
once per cu_seqlens tensor (the record passes one to every layer of a micro-batch).

With STANDIN_TIMING=1 it prints at exit the GPU time of the attention it ran (CUDA events around each forward and
backward) and the host time spent in its op bodies: what the stand-in, not the record, costs a step."""

import atexit
import itertools
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from pgolf.attention import block_mask

_graphs: dict[int, tuple] = {}  # handle -> (out, q, k, v) of a forward whose backward has not run yet
_handles = itertools.count()
_flex = None
_mask = None  # (cu_seqlens, its version, BlockMask) of the last call
_timing = {"forward": [], "backward": [], "host_s": 0.0} if os.environ.get("STANDIN_TIMING") == "1" else None
# A custom op's body runs with autograd's dispatch keys excluded; the forward re-enables them (the thread's state at
# import) so FlexAttention records the graph the backward op replays.
_AUTOGRAD_TLS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def flash_attn_func(q, k, v, causal=True, **_):
    """(B, T, H, D) q and (B, T, H_kv, D) k, v -> (B, T, H, D)."""
    rep = q.size(2) // k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


class _timed:
    """CUDA events around a block and its host time, into _timing[kind] (nothing without STANDIN_TIMING=1)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __enter__(self):
        if _timing is not None:
            self.t0, self.events = time.perf_counter(), [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            self.events[0].record()

    def __exit__(self, *exc):
        if _timing is not None:
            self.events[1].record()
            _timing[self.kind].append(self.events)
            _timing["host_s"] += time.perf_counter() - self.t0


@atexit.register
def _report() -> None:
    if _timing is not None and _timing["forward"]:
        torch.cuda.synchronize()
        gpu = {kind: sum(a.elapsed_time(b) for a, b in _timing[kind]) / 1e3 for kind in ("forward", "backward")}
        print(f"standin: {len(_timing['forward'])} forward / {len(_timing['backward'])} backward calls, "
              f"GPU {gpu['forward']:.2f} s forward + {gpu['backward']:.2f} s backward, "
              f"host {_timing['host_s']:.2f} s in the op bodies", flush=True)


def _block_mask(cu_seqlens: torch.Tensor, n: int):
    global _mask
    if _mask is None or _mask[0] is not cu_seqlens or _mask[1] != cu_seqlens._version:
        pos = torch.arange(n, device=cu_seqlens.device, dtype=torch.int32)
        docs = torch.searchsorted(cu_seqlens.to(torch.int32), pos, right=True)[None]
        _mask = (cu_seqlens, cu_seqlens._version, block_mask(docs))  # holds the tensor: its id is not reused
    return _mask[2]


def _attend(q, k, v, cu_seqlens):
    """(N, H, D) packed q, k, v -> (N, H, D), causal inside each sequence of cu_seqlens (padded at the end with N)."""
    global _flex
    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    mask = _block_mask(cu_seqlens, q.size(0))
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return _flex(q, k, v, block_mask=mask, enable_gqa=True)[0].transpose(0, 1)


@torch.library.custom_op("standin::varlen_train", mutates_args=())
def _varlen_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    handle = next(_handles)
    with torch._C._ForceDispatchKeyGuard(*_AUTOGRAD_TLS), torch.enable_grad(), _timed("forward"):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _attend(*leaves, cu_seqlens)
    _graphs[handle] = (out, *leaves)
    # a copy: inductor may reuse the op's output buffer once the graph is done with it; the saved graph holds `out`
    return out.detach().clone(), torch.tensor(handle, device="cpu")


@_varlen_train.register_fake
def _(q, k, v, cu_seqlens):
    return q.new_empty(q.shape), torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("standin::varlen_backward", mutates_args=())
def _varlen_backward(grad: torch.Tensor, handle: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, *leaves = _graphs.pop(int(handle))
    with torch._C._ForceDispatchKeyGuard(*_AUTOGRAD_TLS), _timed("backward"):
        return torch.autograd.grad(out, leaves, grad)


@_varlen_backward.register_fake
def _(grad, handle, q, k, v):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    # q, k, v saved as the forward graph's outputs, so inductor cannot reuse their buffers while FlexAttention's
    # saved graph still reads them
    ctx.save_for_backward(output[1], *inputs[:3])


def _backward(ctx, grad, _):
    return *_varlen_backward(grad.contiguous(), *ctx.saved_tensors), None


_varlen_train.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("standin::varlen_infer", mutates_args=())
def _varlen_infer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return _attend(q, k, v, cu_seqlens).clone()


@_varlen_infer.register_fake
def _(q, k, v, cu_seqlens):
    return q.new_empty(q.shape)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, causal=True,
                           window_size=(-1, -1), **_):
    """(N, H, D) q and (N, H_kv, D) k, v of sequences packed back to back (starts in cu_seqlens, padded at the end with
    N) -> (N, H, D); each token attends causally inside its own sequence."""
    assert causal and tuple(window_size) == (-1, -1), "the stand-in does causal attention only"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _varlen_train(q, k, v, cu_seqlens_q)[0]
    return _varlen_infer(q, k, v, cu_seqlens_q)
