"""A stand-in for FlashAttention-3's `flash_attn_interface`, so a record's train_gpt.py runs unmodified where FA3 does
not install (bench/record_parity.py puts this folder and the repository on PYTHONPATH): `flash_attn_func` over SDPA,
`flash_attn_varlen_func` over PyTorch's own varlen attention (FlashAttention-2's kernels, through
pgolf.attention.packed_attention: the kernel pgolf's `varlen` backend trains with, so a parity run compares
everything but the attention kernel). Like FA3's, it is a custom op torch.compile does not trace into, with its own
backward; on a CPU it runs the dense document mask (tests).

An earlier stand-in ran FlexAttention inside a custom op and kept its autograd graph for the backward; it cost ~1.6 ms
of host time a layer call and made the record host-bound (bench/NOTES.md, calls 33-35)."""

import torch
import torch.nn.functional as F

from pgolf.attention import load_torch_varlen, packed_attention

load_torch_varlen()  # here, not inside the record's compiled model


def flash_attn_func(q, k, v, causal=True, **_):
    """(B, T, H, D) q and (B, T, H_kv, D) k, v -> (B, T, H, D)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True).transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, causal=True,
                           window_size=(-1, -1), **_):
    """(N, H, D) q and (N, H_kv, D) k, v of sequences packed back to back (starts in cu_seqlens, padded at the end with
    N) -> (N, H, D); each token attends causally inside its own sequence (self-attention: cu_seqlens_k is
    cu_seqlens_q)."""
    assert causal and tuple(window_size) == (-1, -1), "the stand-in does causal attention only"
    return packed_attention(q, k, v, cu_seqlens_q.to(torch.int32), max(max_seqlen_q, max_seqlen_k, 1))
