import hashlib

import pytest
import torch

from pgolf import pack
from pgolf.config import GroupValues, QuantConfig
from pgolf.errors import PgolfError
from pgolf.quant import (apply_pruning, clip_absmax, clip_search, gptq, prune_candidates, qmax,
                         quantize_state, round_rows, search_target, weighted_error)


def random_problem(seed: int, rows=48, cols=64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g))
    X = torch.randn(4 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g)  # correlated inputs
    H = X.T @ X / X.size(0)
    return W, H


@pytest.mark.parametrize("seed", [int(s) for s in torch.randint(0, 2**31, (4,))])  # fresh each run
@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_beats_rtn_on_hessian_weighted_error(seed, bits):
    W, H = random_problem(seed)
    rtn = round_rows(W, clip_absmax(W, bits, QuantConfig(), "mlp"), bits)
    g = gptq(W, H, bits, clip_absmax(W, bits, QuantConfig(), "mlp"), damp=0.01, block_size=16, act_order=True)
    assert weighted_error(W, g.dequantize(), H) < weighted_error(W, rtn.dequantize(), H)


@pytest.mark.parametrize("seed", range(3))
def test_clip_search_is_never_worse_than_rtn(seed):
    W, _ = random_problem(seed)
    W[0, 0] = 25.0  # an outlier makes clipping pay off
    cfg = QuantConfig()
    for bits in (3, 5, 6):
        rtn = round_rows(W, clip_absmax(W, bits, cfg, "mlp"), bits).dequantize()
        cs = round_rows(W, clip_search(W, bits, cfg, "mlp"), bits).dequantize()
        assert ((W - cs) ** 2).sum(1).le(((W - rtn) ** 2).sum(1) + 1e-5).all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_stay_in_range_and_bitpacking_roundtrips(bits):
    W, H = random_problem(bits)
    for q in (round_rows(W * 100, clip_absmax(W, bits, QuantConfig(), "x") * 50, bits),
              gptq(W, H, bits, clip_absmax(W, bits, QuantConfig(), "x"))):
        assert q.codes.abs().max() <= qmax(bits)
        codes = q.codes.numpy()
        assert (pack.unpack_bits(pack.pack_bits(codes, bits), bits, codes.size).reshape(codes.shape) == codes).all()


def model_like_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.q.weight": torch.randn(64, 64, generator=g) * 0.05,
        "blocks.0.mlp.fc.weight": torch.randn(128, 64, generator=g) * 0.05,
        "tok_emb.weight": torch.randn(100, 64, generator=g) * 0.02,
        "blocks.0.attn_scale": torch.rand(64, generator=g),
    }


def hessians_for(state, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, 64, generator=g)
    H = X.T @ X / 512
    return {"h": H}, {"blocks.0.attn.q.weight": "h", "blocks.0.mlp.fc.weight": "h", "tok_emb.weight": "h"}


def quantized(method="gptq", **kw):
    state = model_like_state()
    hess, shared = hessians_for(state)
    cfg = QuantConfig(method=method, keep_float_numel=1000, **kw)
    return quantize_state(state, hess, shared, cfg), state, hess, shared


@pytest.mark.parametrize("codec", ["zstd", "brotli", "lzma"])
@pytest.mark.parametrize("layout", ["int8", "bitpack"])
def test_each_codec_and_layout_roundtrips_exactly(codec, layout):
    result, *_ = quantized()
    blob, sizes = pack.pack(result, {"config": {"x": 1}}, codec, layout)
    assert list(sizes) == [f"{codec}_{layout}"]
    state, meta = pack.unpack(blob)
    assert meta == {"config": {"x": 1}}
    for name, t in result.dequantized().items():
        assert torch.equal(state[name], t), name


def test_auto_returns_the_smallest():
    result, *_ = quantized()
    blob, sizes = pack.pack(result, {}, "auto", "auto")
    assert len(sizes) == 6 and len(blob) == min(sizes.values())


def test_same_inputs_give_a_byte_identical_blob():
    digests = {hashlib.sha256(pack.pack(quantized()[0], {}, "auto", "auto")[0]).hexdigest() for _ in range(2)}
    assert len(digests) == 1


def test_pruning_meets_a_reachable_target_and_names_an_unreachable_one():
    result, state, hess, shared = quantized(method="rtn", bits=GroupValues(3, 3, 3, 3))
    size = lambda r: len(pack.pack(r, {}, "zstd", "int8")[0])  # noqa: E731
    candidates, names = prune_candidates(result, hess, shared)
    full = size(result)
    floor = size(apply_pruning(result, candidates, names, candidates.size(1)))
    target = (full + floor) // 2
    n, got = search_target(lambda n: size(apply_pruning(result, candidates, names, int(n))), 0, candidates.size(1),
                           target, True, "pruning")
    pruned = apply_pruning(result, candidates, names, int(n))
    assert got == size(pruned) <= target and 0 < n < candidates.size(1)
    assert sum(int((q.codes == 0).sum()) for q in pruned.quantized.values()) > sum(int((q.codes == 0).sum()) for q in result.quantized.values())
    with pytest.raises(PgolfError, match=rf"target_bytes=100 is unreachable by pruning: the smallest it reaches is {floor:,}"):
        search_target(lambda n: size(apply_pruning(result, candidates, names, int(n))), 0, candidates.size(1), 100, True, "pruning")


def test_bad_inputs_are_one_line_errors():
    state = model_like_state()
    hess, shared = hessians_for(state)
    with pytest.raises(PgolfError, match=r"quant.bits.mlp: 9; expected an integer from 2 to 8"):
        quantize_state(state, hess, shared, QuantConfig(bits=GroupValues(6, 9, 8, 8), keep_float_numel=1000))
    with pytest.raises(PgolfError, match=r"Hessian 'h' for blocks.0.attn.q.weight is missing"):
        quantize_state(state, {}, shared, QuantConfig(keep_float_numel=1000))
    with pytest.raises(PgolfError, match=r"needs Hessians"):
        quantize_state(state, {}, {}, QuantConfig(keep_float_numel=1000))
    with pytest.raises(PgolfError, match=r"Hessian for blocks.0.attn.q.weight has shape \(32, 32\), expected \(64, 64\)"):
        quantize_state(state, {"h": torch.eye(32)}, shared, QuantConfig(keep_float_numel=1000))


def test_corrupted_or_truncated_blob_is_refused():
    blob, _ = pack.pack(quantized()[0], {}, "zstd", "int8")
    with pytest.raises(PgolfError, match="corrupted or truncated blob"):
        pack.unpack(blob[:-50], "m.blob")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    with pytest.raises(PgolfError, match="m.blob: corrupted"):
        pack.unpack(bytes(flipped), "m.blob")
    with pytest.raises(PgolfError, match="bad magic"):
        pack.unpack(b"PK" + blob[2:], "m.blob")
    tampered = bytearray(blob)
    tampered[10] ^= 0x01  # inside the stored sha256
    with pytest.raises(PgolfError, match="sha256 mismatch"):
        pack.unpack(bytes(tampered), "m.blob")


def test_every_method_quantizes_a_model_state():
    for method in ("rtn", "clip_search", "sdclip", "gptq", "adaptive_clip"):
        result, state, hess, _ = quantized(method=method)
        assert set(result.quantized) == {"blocks.0.attn.q.weight", "blocks.0.mlp.fc.weight", "tok_emb.weight"}
        assert set(result.floats) == {"blocks.0.attn_scale"} and result.floats["blocks.0.attn_scale"].dtype == torch.float16
        rel = weighted_error(state["blocks.0.mlp.fc.weight"], result.quantized["blocks.0.mlp.fc.weight"].dequantize())
        assert rel < 0.01 * state["blocks.0.mlp.fc.weight"].square().sum(), method


def test_hessians_are_fp32_shared_by_q_k_v_and_include_the_tied_head():
    from conftest import tiny_model
    from pgolf.calibrate import collect_hessians
    from pgolf.model import GPT

    model = GPT(tiny_model(bigram_buckets=32, ve_last=1))
    batches = [torch.randint(0, 320, (2, 16)) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under CUDA's bf16 autocast
        H, shared, tokens = collect_hessians(model, iter(batches))
    assert tokens == 96 and all(h.dtype == torch.float32 for h in H.values())
    assert shared["blocks.0.attn.k.weight"] == shared["blocks.0.attn.v.weight"] == "blocks.0.attn.q.weight"
    assert shared["blocks.0.mlp.fc.weight"] == "blocks.0.mlp.fc.weight" != shared["blocks.0.attn.proj.weight"]
    assert set(shared) == set(model.quantizable_linears()) | {"tok_emb.weight"}
    x = model.hidden(torch.cat(batches)).reshape(-1, 32).double()
    torch.testing.assert_close(H["tok_emb.weight"].double(), x.T @ x / 96, rtol=0.05, atol=1e-3)
