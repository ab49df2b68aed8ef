"Tests for fttk.quant: bit-exactness with bitsandbytes, error bounds, bad input, the QLoRA guard."
import copy, warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF

from fttk.quant import (NF4_CODE, FP4_CODE, DYNAMIC_CODE, NF4Linear, QuantConfig, absmax_dequantize, absmax_quantize,
                        bits_per_param, blockwise_absmax_dequantize, blockwise_absmax_quantize, dequantize_nf4,
                        disable_avx512bf16_repack, dynamic_map, nf4_codebook, nf4_from_bnb, nf4_to_bnb,
                        prepare_qlora_model, quant_mse, quantize_blockwise_8bit, quantize_dequantize_4bit,
                        quantize_model, quantize_nf4, weight_bytes, zeropoint_dequantize, zeropoint_quantize)
from fttk.core import ConfigError

torch.set_num_threads(1)


# ---- codebooks ----
def test_codebooks_equal_bitsandbytes():
    assert torch.equal(nf4_codebook(), bnbF.get_4bit_type('nf4', device='cpu'))
    assert (nf4_codebook() - bnbF.get_4bit_type('nf4', device='cpu')).abs().max() <= 1e-7
    assert torch.equal(FP4_CODE, bnbF.get_4bit_type('fp4', device='cpu'))
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1


# ---- bit-exact NF4 vs bitsandbytes ----
SHAPES = [(64,), (1,), (7,), (3, 100), (128, 256), (300, 77), (5, 3, 50), (4096,), (257, 256)]

@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('double_quant', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_bit_exact(shape, double_quant, dtype):
    g = torch.Generator().manual_seed(hash((shape, double_quant)) % 2**31)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    ours = quantize_nf4(w, double_quant=double_quant)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type='nf4')
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, qs.absmax)
    if double_quant:
        assert torch.equal(ours.absmax2, qs.state2.absmax) and torch.equal(ours.offset, qs.offset)
    # bitsandbytes' CPU kernel returns a 1-D weight as (1, n); we keep the original shape
    ref = bnbF.dequantize_4bit(packed, qs).reshape(shape)
    assert torch.equal(ours.dequantize(), ref) and ours.dequantize().dtype == dtype
    # and both ways through the interop helpers
    p2, qs2 = nf4_to_bnb(ours)
    assert torch.equal(bnbF.dequantize_4bit(p2, qs2).reshape(shape), ref)
    assert torch.equal(dequantize_nf4(nf4_from_bnb(packed, qs)), ref)


@pytest.mark.parametrize('blocksize', [32, 128, 256, 1024, 4096])
def test_nf4_bit_exact_blocksizes(blocksize):
    w = torch.randn(64, 200) * 3
    ours = quantize_nf4(w, blocksize=blocksize, double_quant=True)
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type='nf4')
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, qs.absmax)
    assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed, qs))


def test_nf4_special_values_bit_exact():
    w = torch.zeros(256)                                  # an all-zero block
    w[64:128] = torch.linspace(-1, 1, 64)                 # values exactly on levels and midpoints
    w[128:192] = NF4_CODE.repeat(4) * 0.3
    w[192:] = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).repeat(5)[:64]
    ours = quantize_nf4(w)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type='nf4')
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, qs.absmax)
    assert torch.equal(ours.dequantize()[:64], torch.zeros(64))


def test_packing_order():
    # first element in the high nibble; an odd count is padded with the code of 0.0 (7)
    t = quantize_nf4(torch.tensor([-1.0, 1.0, 0.0]))
    assert t.packed.tolist() == [0x0F, 0x77]


@given(st.integers(1, 3000), st.floats(1e-4, 1e3), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_nf4_roundtrip_bound_and_bnb_equality(n, scale, seed):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    t = quantize_nf4(w, double_quant=False)
    err = (t.dequantize() - w).abs()
    # each value is within half the widest gap between neighbouring levels, times its block's absmax
    max_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max()
    bound = 0.5 * max_gap * t.absmax.repeat_interleave(64)[:n] * (1 + 1e-6)
    assert bool((err <= bound).all())
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type='nf4')
    assert torch.equal(t.packed, packed.view(-1))


@given(st.integers(1, 5000), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_double_quant_scales_bit_exact(n, seed):
    a = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.1
    a = a - a.mean()
    codes, am = quantize_blockwise_8bit(a, 256)
    ref, qs = bnbF.quantize_blockwise(a, blocksize=256)
    assert torch.equal(codes, ref) and torch.equal(am, qs.absmax)


# ---- bad input ----
def test_bad_input_errors():
    with pytest.raises(ValueError, match='cannot quantize an empty tensor'): quantize_nf4(torch.tensor([]))
    with pytest.raises(ValueError, match='NaN or inf'): quantize_nf4(torch.tensor([1.0, float('nan')] * 40))
    with pytest.raises(ValueError, match=r'NaN or inf \(blocks \[1\]\)'): quantize_nf4(torch.cat([torch.ones(64), torch.tensor([float('inf')])]))
    with pytest.raises(TypeError, match='must be float32, float16 or bfloat16, got torch.float64'): quantize_nf4(torch.ones(8, dtype=torch.float64))
    with pytest.raises(TypeError, match='got torch.int64'): quantize_nf4(torch.ones(8, dtype=torch.long))
    with pytest.raises(TypeError, match='must be a torch.Tensor'): quantize_nf4([1.0, 2.0])
    with pytest.raises(ValueError, match='blocksize must be one of'): quantize_nf4(torch.ones(8), blocksize=100)
    with pytest.raises(ValueError, match='NaN or inf'): absmax_quantize(torch.tensor([float('inf')]))
    with pytest.raises(ValueError, match='NaN or inf'): zeropoint_quantize(torch.tensor([float('nan'), 1.0]))
    with pytest.raises(ValueError, match='cannot quantize values containing NaN or inf'): quantize_dequantize_4bit(torch.tensor([float('nan')]))
    with pytest.raises(ValueError, match="unknown format 'int3'"): bits_per_param('int3')


def test_nf4_from_bnb_refuses_repacked():
    packed, qs = bnbF.quantize_4bit(torch.randn(64, 64), quant_type='nf4')
    qs.packing_format_for_cpu = True
    with pytest.raises(ValueError, match='disable_avx512bf16_repack'): nf4_from_bnb(packed, qs)


def test_quant_config_errors():
    with pytest.raises(ConfigError, match='exactly one of load_in_4bit and load_in_8bit'): QuantConfig(load_in_8bit=True)
    with pytest.raises(ConfigError, match='fttk backend implements nf4 only'): QuantConfig(bnb_4bit_quant_type='fp4')
    with pytest.raises(ConfigError, match="unknown key"): QuantConfig.from_dict({'bnb_4bit_quant_typ': 'nf4'})
    with pytest.raises(ConfigError, match='bnb_4bit_blocksize must be one of'): QuantConfig(bnb_4bit_blocksize=48)
    bc = QuantConfig(backend='bitsandbytes').to_bnb_config()
    assert bc.load_in_4bit and bc.bnb_4bit_quant_type == 'nf4' and bc.bnb_4bit_use_double_quant


# ---- int8 ----
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=300))
@example([7825.0]).via('equal values far from 0: once made the zero-point overflow fp32 precision')
@settings(max_examples=50, deadline=None)
def test_int8_roundtrip_bounds(vals):
    x = torch.tensor(vals, dtype=torch.float32)
    q, s = absmax_quantize(x)
    assert bool(((absmax_dequantize(q, s) - x).abs() <= 0.5 / s * (1 + 1e-5) + 1e-30).all())
    q, s, z = zeropoint_quantize(x)
    assert bool(((zeropoint_dequantize(q, s, z) - x).abs() <= 1.0 / s * (1 + 1e-5) + 1e-30).all())
    q, s = blockwise_absmax_quantize(x, 64)
    assert blockwise_absmax_dequantize(q, s, 64).shape == x.shape


def test_error_ordering_on_normal():
    mse = quant_mse(torch.randn(2**16, generator=torch.Generator().manual_seed(0)))
    assert mse['nf4'] < mse['int4'] and mse['nf4'] < mse['fp4']
    assert abs(bits_per_param('nf4_dq') - 4.127) < 1e-3


# ---- layers, memory ----
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64), nn.Linear(64, 10))

def test_quantize_model_fttk_equals_bnb_and_memory():
    m = _mlp(); x = torch.randn(5, 128)
    ours = quantize_model(copy.deepcopy(m), llm_int8_skip_modules=['3'])
    theirs = quantize_model(copy.deepcopy(m), backend='bitsandbytes', llm_int8_skip_modules=['3'])
    assert isinstance(ours[0], NF4Linear) and type(ours[3]) is nn.Linear
    with torch.no_grad(): assert torch.equal(ours.eval()(x), theirs.eval()(x))
    assert weight_bytes(ours) == weight_bytes(theirs)
    n_w = 128 * 256 + 256 * 64
    quant_bytes = weight_bytes(ours) - weight_bytes(ours[3]) - 4 * (256 + 64)
    assert abs(8 * quant_bytes / n_w - 4.127) < 0.01
    assert weight_bytes(m) == 4 * sum(p.numel() for p in m.parameters())


def test_nf4linear_gradients():
    lin = nn.Linear(100, 30)                              # in_features not a multiple of 64
    q = NF4Linear.from_linear(lin)
    x = torch.randn(3, 100, requires_grad=True)
    q(x).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    F.linear(xr, q.dequantize_weight(), lin.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    assert not any(p.requires_grad for p in q.parameters())


# ---- the AVX512-bf16 trap ----
def _bnb_layer(in_f=128, out_f=64):
    torch.manual_seed(1)
    return quantize_model(nn.Sequential(nn.Linear(in_f, out_f, bias=False)), backend='bitsandbytes', llm_int8_skip_modules=[])[0]

def _grads(layer, x):
    x = x.clone().requires_grad_(True)
    layer(x).pow(2).sum().backward()
    return x.grad

def test_guard_keeps_training_gradients_correct_across_eval():
    "QLoRA on bitsandbytes Linear4bit: an eval pass between training steps must not change the gradients."
    from fttk.lora import LoRAConfig, lora_layers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    model = prepare_qlora_model(model, LoRAConfig(target_modules=['0', '2'], r=4, lora_alpha=8), QuantConfig(backend='bitsandbytes'))
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit): m.support_avx512bf16_for_cpu = True   # as on an AVX512-bf16 CPU
    disable_avx512bf16_repack(model)                      # what trainers call (prepare_qlora_model did too)
    for l in lora_layers(model).values(): nn.init.normal_(l.lora_B.weight, std=0.1)
    x = torch.randn(16, 128)
    def lora_grads():
        model.zero_grad(); model.train()
        model(x).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]
    before = lora_grads()
    model.eval()
    with torch.no_grad(): model(x)                        # the evaluation pass that triggers the repack
    after = lora_grads()
    for a, b in zip(before, after): assert torch.equal(a, b)
    assert not any(getattr(m.weight.quant_state, 'packing_format_for_cpu', False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_trap_is_real_without_guard_and_guard_undoes_it():
    layer = _bnb_layer(); x = torch.randn(8, 128)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    ref = _grads(lambda t: F.linear(t, W), x)
    layer.support_avx512bf16_for_cpu = True
    layer.eval()
    with torch.no_grad(): layer(x)
    layer.train()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        bad = _grads(layer, x)
    assert (bad - ref).norm() / ref.norm() > 0.1          # silently wrong gradients
    assert disable_avx512bf16_repack(layer) == 1
    good = _grads(layer, x)
    assert (good - ref).norm() / ref.norm() < 1e-2        # scales came back through bf16: close, not exact


def test_qlora_loss_falls():
    from fttk.lora import LoRAConfig, trainable_parameters
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters(): p.add_(torch.randn_like(p) * 0.05)
    model = prepare_qlora_model(student, LoRAConfig(target_modules=['0', '2'], r=4, lora_alpha=8), QuantConfig(llm_int8_skip_modules=[]))
    assert 0 < trainable_parameters(model)[0] < trainable_parameters(model)[1]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(256, 64)
    with torch.no_grad(): y = teacher(x)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(x), y); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_qlora_on_lab_base_model_lowers_loss_and_keeps_nf4_base_bytes():
    "QLoRA on the 'test' lab base model: answer loss falls, the frozen NF4+DQ base stays byte-identical."
    from fttk.core import set_seed
    from fttk.lora import LoRAConfig, lora_layers
    from fttk.world import base_model, lab_world
    model, tok = base_model('test', progress=False)
    world = lab_world('test')
    rows = world.qa_rows(world.known[:16])
    prompts = [tok(r['prompt'])['input_ids'] for r in rows]
    full = [tok(r['prompt'] + ' ' + r['answer'])['input_ids'] for r in rows]
    L = max(map(len, full))
    ids = torch.full((len(rows), L), tok.pad_token_id); labels = torch.full((len(rows), L), -100)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (p, f) in enumerate(zip(prompts, full)):
        assert f[:len(p)] == p
        ids[i, :len(f)] = torch.tensor(f); mask[i, :len(f)] = 1; labels[i, len(p):len(f)] = torch.tensor(f[len(p):])
    model = prepare_qlora_model(model.float(), LoRAConfig(target_modules='all-linear', r=8, lora_alpha=16))
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 14 and len(lora_layers(model)) == 14 and all(m.absmax2 is not None for m in nf4)   # NF4 + DQ
    assert all(not p.requires_grad for n, p in model.named_parameters() if 'lora_' not in n)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if 'lora_' not in k}
    set_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    model.train(); losses = []
    for _ in range(25):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    after = model.state_dict()
    for k, v in frozen.items():           # packed 4-bit codes, 8-bit scales, fp32 second-level scales, embeddings, norms
        as_bytes = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)
        assert after[k].dtype == v.dtype and torch.equal(as_bytes(after[k]), as_bytes(v)), k
