"""The GPT of the challenge's records: a baseline decoder plus every option of the record stack, each off by default.

The model built from a config is the network as it ends training: depth recurrence runs all its passes
(the trainer lowers `passes` only while training is early). Everything that rebuilds a model from an
artifact therefore scores, calibrates and quantizes the network that was trained.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8, fused_ce, fused_qk
from .attention import DocMask, attention, document_mask
from .config import ModelConfig
from .registry import Registry


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


ROPE_TABLE_LEN = 4096  # positions with precomputed rope tables; longer sequences compute theirs
# model.rope_freq_dtype: the precision RoPE's frequencies are rounded to before the angles are taken. The record's
# model is cast to bf16 and back, which leaves its frequencies (a buffer) rounded to bf16 in training and in eval
# (0.031738 for 0.031623): a slightly different positional code, and the record's exact function
ROPE_FREQ_DTYPES: Registry[torch.dtype] = Registry("model.rope_freq_dtype")
ROPE_FREQ_DTYPES.add("float32", torch.float32)
ROPE_FREQ_DTYPES.add("bfloat16", torch.bfloat16)


ACTIVATIONS: Registry = Registry("model.activation")  # (hidden pre-activation, cfg) -> post-activation


@ACTIVATIONS.register("relu2")
def relu2(h: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return F.relu(h).square()


@ACTIVATIONS.register("leaky_relu2")
def leaky_relu2(h: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return F.leaky_relu(h, cfg.leaky_slope).square()


def define_compiled_ops() -> None:
    """The fused kernels' triton ops, which a compiled GPT calls: before torch.compile of the model or its parts."""
    fused_qk.define_compiled_ops()
    fused_ce.define_compiled_ops()


def activation_dtype(device: torch.device) -> torch.dtype:
    """The residual stream's dtype: autocast's (bf16 on CUDA) when it is on, else fp32."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)  # autocast may run it in fp32: keep the input's dtype


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric int-k rounding with a straight-through gradient (late QAT)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-8)
    q = (w / scale).round().clamp(-qmax, qmax) * scale
    return w + (q - w).detach()


class CastedLinear(nn.Linear):
    """fp32 master weight, matmul in the activation dtype; optional fake quantization."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.qat_bits = 0
        self.fp8 = False  # the matmul through FP8 (train.fp8; pgolf.fp8)
        self.zero_init = zero_init
        self.lora: Callable[[torch.Tensor], torch.Tensor] | None = None  # x -> a delta of the output (eval's LoRA TTT)
        if zero_init:
            nn.init.zeros_(self.weight)

    def effective_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.qat_bits) if self.qat_bits else self.weight

    def scaled_weight(self, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The weight with each output channel times out_scale: folded in, so backward needs neither the unscaled
        output nor a token-wide reduction for the scale's gradient."""
        w = self.effective_weight()
        return w if out_scale is None else w * out_scale[:, None]

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T, each output channel times out_scale if given."""
        return with_adapter(matmul(x, self.scaled_weight(out_scale), self.fp8), self.lora, x, out_scale)


def matmul(x: torch.Tensor, w: torch.Tensor, through_fp8: bool) -> torch.Tensor:
    """x Wᵀ in x's dtype: W cast to it, or both through FP8 (train.fp8)."""
    return fp8.linear(x, w) if through_fp8 else F.linear(x, w.to(x.dtype))


def with_adapter(y: torch.Tensor, adapter: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor,
                 out_scale: torch.Tensor | None) -> torch.Tensor:
    """y plus an adapter's delta from the module's input x (eval's LoRA TTT), scaled as the module's output is."""
    if adapter is None:
        return y
    d = adapter(x)
    return y + (d * out_scale if out_scale is not None else d).to(y.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first 2*cos.size(-1) dims of each head; x is (B, T, H, D), cos and sin (T, rd)."""
    rd = cos.size(-1)
    cos, sin = cos[:, None], sin[:, None]
    x1, x2, rest = x[..., :rd], x[..., rd:2 * rd], x[..., 2 * rd:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def qk_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_gain: torch.Tensor | None,
                 heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, (heads + 2 kv_heads) D) qkv rows -> q, k, v as (B, T, heads or kv_heads, D), q and k rotated; with a
    q_gain (qk-norm on), q and k RMS-normed per head first and q times q_gain. The definition fused_qk follows."""
    B, T, W = qkv.shape
    D = W // (heads + 2 * kv_heads)
    q, k, v = qkv.split((heads * D, kv_heads * D, kv_heads * D), dim=-1)
    q, k, v = q.view(B, T, heads, D), k.view(B, T, kv_heads, D), v.view(B, T, kv_heads, D)
    if q_gain is not None:
        q, k = rms_norm(q), rms_norm(k)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if q_gain is not None:
        q = q * q_gain.to(q.dtype)[:, None]
    return q, k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, xsa: bool, value_embed: bool):
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.heads
        self.q = CastedLinear(cfg.dim, cfg.heads * self.head_dim)
        self.k = CastedLinear(cfg.dim, cfg.kv_heads * self.head_dim)
        self.v = CastedLinear(cfg.dim, cfg.kv_heads * self.head_dim)
        self.proj = CastedLinear(cfg.heads * self.head_dim, cfg.dim, zero_init=True)
        self.qk_norm, self.xsa = cfg.qk_norm, xsa
        if cfg.qk_norm:
            self.q_gain = nn.Parameter(torch.full((cfg.heads,), cfg.qk_gain_init))
        self.gate = CastedLinear(cfg.dim, cfg.heads, zero_init=True) if cfg.head_gate else None
        if cfg.sparse_gate:  # SparseAttnGate: each head's output times sigmoid(scale * w_h . x[:gate_window])
            self.sparse_gate = nn.Parameter(torch.zeros(cfg.heads, cfg.gate_window))
            self.gate_window, self.gate_scale = cfg.gate_window, cfg.sparse_gate_scale
        else:
            self.sparse_gate = None
        self.ve_scale = nn.Parameter(torch.ones(1)) if value_embed else None
        self.lora: Callable[[torch.Tensor], torch.Tensor] | None = None  # x -> a delta of the output (LoRA TTT's o)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ve: torch.Tensor | None,
                out_scale: torch.Tensor | None = None, mask: DocMask | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # q, k and v as one matmul: x is read once, and backward makes one dx instead of three to sum
        w = torch.cat([self.q.effective_weight(), self.k.effective_weight(), self.v.effective_weight()])
        qkv = matmul(x, w, self.q.fp8)
        if self.q.lora or self.k.lora or self.v.lora:
            qkv = qkv + torch.cat([m.lora(x) if m.lora else x.new_zeros(B, T, m.out_features)
                                   for m in (self.q, self.k, self.v)], dim=-1).to(qkv.dtype)
        if self.qk_norm and fused_qk.usable(qkv):
            q, k, v = fused_qk.qk_norm_rope(qkv, cos, sin, self.q_gain, self.heads, self.kv_heads)
        else:
            q, k, v = qk_norm_rope(qkv, cos, sin, self.q_gain if self.qk_norm else None, self.heads, self.kv_heads)
        if self.ve_scale is not None and ve is not None:
            v = v + self.ve_scale.to(v.dtype) * ve.view_as(v)
        dt = activation_dtype(x.device)
        y = attention(q.to(dt), k.to(dt), v.to(dt), mask)
        if self.xsa:  # exclusive self attention: remove each head's component along its own token's value
            g = self.heads // self.kv_heads
            vn = F.normalize(v, dim=-1).unsqueeze(3)
            y = y.view(B, T, self.kv_heads, g, self.head_dim)
            y = (y - (y * vn).sum(-1, keepdim=True) * vn).view(B, T, self.heads, self.head_dim)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).unsqueeze(-1)
        if self.sparse_gate is not None:
            g = F.linear(x[..., :self.gate_window], self.sparse_gate.to(x.dtype))
            y = y * torch.sigmoid(self.gate_scale * g).unsqueeze(-1)
        return with_adapter(self.proj(y.reshape(B, T, -1), out_scale), self.lora, x, out_scale)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.dim)
        self.fc = CastedLinear(cfg.dim, hidden)
        self.proj = CastedLinear(hidden, cfg.dim, zero_init=True)
        self.cfg, self.act = cfg, ACTIVATIONS[cfg.activation]
        self.lora: Callable[[torch.Tensor], torch.Tensor] | None = None  # x -> a delta of the output (LoRA TTT's mlp)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        return with_adapter(self.proj(self.act(self.fc(x), self.cfg), out_scale), self.lora, x, out_scale)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        xsa = layer >= cfg.layers - cfg.xsa_last
        self.attn = Attention(cfg, xsa, value_embed=layer >= cfg.layers - cfg.ve_last)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.dim), torch.zeros(cfg.dim))))
        self.norm_scale = 1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.parallel = 0 <= cfg.parallel_from <= layer
        if self.parallel and cfg.parallel_lanes == 2:  # the record's two lanes: how each output enters each lane
            self.lane_post = nn.Parameter(torch.ones(2, 2))  # [attn, mlp] -> [lane 0, lane 1]
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))  # each lane's own carry

    def forward(self, x, x0, cos, sin, ve, mask=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.norm_scale
        a = self.attn(h, cos, sin, ve, self.attn_scale, mask)
        if self.parallel:
            return x + a + self.mlp(h, self.mlp_scale)
        x = x + a
        return x + self.mlp(rms_norm(x) * self.norm_scale, self.mlp_scale)

    def forward_lanes(self, lane0, lane1, x0, cos, sin, ve, mask=None):
        """Two-lane parallel residuals (record 2026-04-27): attention reads lane 0 (mixed with x0), the MLP reads
        lane 1, and both outputs enter both lanes through learned weights."""
        mix = self.resid_mix.to(lane0.dtype)
        a = self.attn(rms_norm(mix[0] * lane0 + mix[1] * x0) * self.norm_scale, cos, sin, ve, self.attn_scale, mask)
        m = self.mlp(rms_norm(lane1) * self.norm_scale, self.mlp_scale)
        post, resid = self.lane_post.to(lane0.dtype), self.lane_resid.to(lane0.dtype)
        return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


class BigramHash(nn.Module):
    """Embedding of a hash of (previous token, token), projected to the model width."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.emb = nn.Embedding(buckets, dim)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.proj = CastedLinear(dim, model_dim, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        prev = F.pad(idx[:, :-1], (1, 0))
        h = torch.bitwise_xor(36313 * idx, 27191 * prev) % (self.buckets - 1)
        h[:, 0] = self.buckets - 1  # the first position has no previous token
        return self.scale * self.proj(self.emb(h))


SMEAR_GATES: Registry = Registry("model.smear_gate")  # cfg -> module mixing each position with the previous one


class ChannelSmear(nn.Module):
    """Blend each position with the previous one through a learned per-channel gate (after the embedding norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(cfg.dim))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        return (1 - g) * x + g * F.pad(x[:, :-1], (0, 0, 1, 0))


class BosSmear(nn.Module):
    """x_t += lambda * sigmoid(w . x_t[:gate_window]) * x_(t-1) on the raw embeddings, except where token t is
    BOS: a packed stream must not carry the last token of one document into the next (record 2026-04-27)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.window, self.bos_id = cfg.gate_window, cfg.bos_id
        self.gate = CastedLinear(cfg.gate_window, 1, zero_init=True)
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g = self.lam.to(x.dtype) * torch.sigmoid(self.gate(x[:, 1:, :self.window]))
        keep = (idx[:, 1:] != self.bos_id).to(x.dtype).unsqueeze(-1)
        return torch.cat([x[:, :1], x[:, 1:] + g * x[:, :-1] * keep], dim=1)


SMEAR_GATES.add("off", None)
SMEAR_GATES.add("channel", ChannelSmear)
SMEAR_GATES.add("bos", BosSmear)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        head_dim = cfg.dim // cfg.heads
        self.rope_dims = (cfg.rope_dims or head_dim) // 2
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.embed_init_std)
        self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, cfg.dim) if cfg.bigram_buckets else None
        smear = SMEAR_GATES[cfg.smear_gate]
        self.smear = smear(cfg) if smear is not None else None
        if cfg.ve_last:
            self.ve_emb = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
            nn.init.normal_(self.ve_emb.weight, std=0.02)
            self.ve_proj = CastedLinear(cfg.ve_dim, cfg.kv_heads * head_dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.max_passes = cfg.recur_loops if cfg.recur_start >= 0 else 0
        self.passes = self.max_passes  # extra passes over the looped layers now running
        if cfg.unet_skips:
            n_skips = len(self.layer_order(self.max_passes)) // 2
            self.skip_weights = nn.Parameter(torch.ones(n_skips, cfg.dim))
            self.skip_gates = nn.Parameter(torch.zeros(n_skips, cfg.dim)) if cfg.skip_gates else None
        self.lm_head = None if cfg.tied_embed else CastedLinear(cfg.dim, cfg.vocab_size, zero_init=True)
        self.head_lora: Callable[[torch.Tensor], torch.Tensor] | None = None  # eval's LoRA TTT on the head
        # eval's LoRA TTT: told, before each block runs, which pass over that block this is (0 for the first), so that
        # the choice of a looped layer's LoRA stays out of the block (a block compiled alone then serves every pass)
        self.pass_hook: Callable[[int], None] | None = None
        if cfg.ortho_init:  # records' OrthoInit: hidden matrices orthogonal, zero-initialized projections left at 0
            for m in self.modules():
                if isinstance(m, CastedLinear) and not m.zero_init and min(m.weight.shape) >= 64:
                    nn.init.orthogonal_(m.weight)
        angles = self._rope_angles(ROPE_TABLE_LEN)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def layer_order(self, passes: int | None = None) -> list[int]:
        """Physical layers in the order they run: with recurrence, [recur_start, recur_end] runs 1 + passes times."""
        passes = self.passes if passes is None else passes
        order = list(range(self.cfg.layers))
        if passes:
            s, e = self.cfg.recur_start, self.cfg.recur_end
            order = order[:s] + order[s:e + 1] * (1 + passes) + order[e + 1:]
        return order

    def _rope_angles(self, T: int, device: torch.device | None = None) -> torch.Tensor:
        inv = 1.0 / self.cfg.rope_base ** (torch.arange(self.rope_dims, device=device, dtype=torch.float32) / self.rope_dims)
        inv = inv.to(ROPE_FREQ_DTYPES[self.cfg.rope_freq_dtype]).float()
        return torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)

    def _rope(self, T: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if T <= self.rope_cos.size(0):  # tables, not sin/cos recomputed inside every rope kernel
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            angles = self._rope_angles(T, device)
            cos, sin = angles.cos(), angles.sin()
        return cos.to(dtype), sin.to(dtype)

    def hidden(self, idx: torch.Tensor, doc_mask: bool | DocMask = False) -> torch.Tensor:
        """Final normed hidden states (B, T, dim): the input of the output head. With `doc_mask` (True, or a mask
        made from idx by attention.document_mask), attention stays inside each document (a new one at every BOS)."""
        dt = activation_dtype(idx.device)  # a bf16 stream halves the elementwise traffic
        # the table, not the rows, is cast: x0, which every layer reads again, is then bf16 as well
        x = F.embedding(idx, self.tok_emb.weight.to(dt))
        if self.bigram is not None:
            x = x + self.bigram(idx).to(dt)
        if isinstance(self.smear, BosSmear):
            x = self.smear(x, idx)
        x = rms_norm(x)
        if isinstance(self.smear, ChannelSmear):
            x = self.smear(x, idx)
        x0 = x
        cos, sin = self._rope(idx.size(1), idx.device, x.dtype)
        ve = self.ve_proj(self.ve_emb(idx)) if self.cfg.ve_last else None
        # U-Net over the running order (recurrent passes included): its first half pushes skips, which the
        # second half pops in reverse, the k-th decoder position weighting (and, with gates, blending) the k-th
        mask = document_mask(idx, self.cfg.bos_id) if doc_mask is True else doc_mask or None
        order = self.layer_order()
        n_enc = len(order) // 2 if self.cfg.unet_skips else 0
        skips, lane1 = [], None  # lane 1 exists from the first two-lane block on; x is lane 0 from there
        for j, i in enumerate(order):
            block = self.blocks[i]
            if lane1 is None and hasattr(block, "lane_post"):
                lane1 = x  # the second lane forks before this position's skip enters lane 0
            if j >= n_enc and skips:
                k = j - n_enc
                skip = self.skip_weights[k].to(x.dtype) * skips.pop()
                if self.skip_gates is not None:
                    x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[k].to(x.dtype)))
                else:
                    x = x + skip
            if self.pass_hook is not None:
                self.pass_hook(order[:j].count(i))
            if lane1 is not None:
                x, lane1 = block.forward_lanes(x, lane1, x0, cos, sin, ve, mask)
            else:
                x = block(x, x0, cos, sin, ve, mask)
            if j < n_enc:
                skips.append(x)
        return rms_norm(x if lane1 is None else 0.5 * (x + lane1))

    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The output head's raw logits (with eval's LoRA delta while one is attached)."""
        raw = F.linear(h, self.head_weight().to(h.dtype))
        return raw + self.head_lora(h).to(raw.dtype) if self.head_lora is not None else raw

    def logits(self, idx: torch.Tensor, temperature: float = 1.0, doc_mask: bool | DocMask = False) -> torch.Tensor:
        return self.logits_from_hidden(self.hidden(idx, doc_mask), temperature)

    def logits_from_hidden(self, h: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        logits = self.head(h).float()
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits / temperature if temperature != 1.0 else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, doc_mask: bool | DocMask = False) -> torch.Tensor:
        """Mean next-token cross-entropy (nats); softcapped, in one fused kernel where Triton runs (fused_ce)."""
        if self.cfg.logit_softcap and fused_ce.usable(idx):
            h = self.hidden(idx, doc_mask)
            raw = self.head(h)
            return fused_ce.softcapped_cross_entropy(raw.view(-1, raw.size(-1)), targets.reshape(-1),
                                                     self.cfg.logit_softcap).mean()
        logits = self.logits(idx, doc_mask=doc_mask)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def token_nll(self, idx: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  doc_mask: bool | DocMask = False) -> torch.Tensor:
        """Per-token NLL (B, T) in nats."""
        return self.nll_from_hidden(self.hidden(idx, doc_mask), targets, temperature)

    def nll_from_hidden(self, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        logits = self.logits_from_hidden(h, temperature)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)

    def quantizable_linears(self) -> dict[str, nn.Module]:
        """Linear layers whose weights are worth GPTQ, by weight name."""
        return {f"{n}.weight": m for n, m in self.named_modules() if isinstance(m, CastedLinear)}

    def set_fp8(self, on: bool) -> None:
        """The blocks' projections (q, k, v, o, fc, proj) through FP8 matmuls; the head, embeddings and gates not."""
        for b in self.blocks:
            for m in (b.attn.q, b.attn.k, b.attn.v, b.attn.proj, b.mlp.fc, b.mlp.proj):
                m.fp8 = on

    def set_qat(self, bits: int) -> None:
        for m in self.modules():
            if isinstance(m, CastedLinear):
                m.qat_bits = bits
