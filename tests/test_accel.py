"""fttk.accel: each Triton kernel equal to its PyTorch reference (forward and gradients), run on CPU
tensors in Triton's interpreter; the PyTorch twins of the same equations; offloaded checkpointing;
load_model's backends equal to transformers + peft; the errors.

Tolerances come from the arithmetic: float64 comparisons bound rounding by (reduction length) x eps64
times the size of the values; float32 by (reduction length) x eps32; bf16 outputs by one bf16 rounding.
Kernel tests need Triton (`pip install triton`, in the dev extra) and skip, named, without it."""
import copy, math, warnings

import pytest
import torch
import torch.nn.functional as F

import fttk.accel as A
from fttk.core import set_seed
from fttk.lora import LoRAConfig

needs_triton = pytest.mark.skipif(not A.HAS_TRITON, reason="Triton is not installed (pip install triton)")
EPS64, EPS32, EPS_BF16 = 2.0**-52, 2.0**-23, 2.0**-7


@pytest.fixture
def interp():
    with A.triton_interpreter(): yield


def grads_of(f, inputs, g):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = f(*inputs)
    return (y, *torch.autograd.grad(y, inputs, g))


def max_err(a, b):
    return max((u.double() - v.double()).abs().max().item() for u, v in zip(a, b))


def rand(*shape, seed=0, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------------------------ kernels
@needs_triton
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_rms_norm_kernel_equals_reference(interp, dtype):
    n = 37                                            # not a power of two: the block is masked
    x, dy = rand(6, n, seed=1, dtype=dtype), rand(6, n, seed=2, dtype=dtype)
    w = (rand(n, seed=3).abs() + 0.5).to(dtype)
    ours = grads_of(lambda x, w: A.rms_norm(x, w, 1e-5), (x, w), dy)
    ref = grads_of(lambda x, w: A.rms_norm_reference(x, w, 1e-5), (x, w), dy)
    # one sum of n squares, one dot product of length n; |values| < 8 (x, w, dy < 4; rho < 2)
    assert max_err(ours, ref) < n * torch.finfo(dtype).eps * 8 * 6   # dw sums 6 rows


@needs_triton
def test_rms_norm_kernel_bf16_rounds_like_transformers(interp):
    x, w = rand(4, 64, seed=4, dtype=torch.bfloat16), (rand(64, seed=5).abs() + 0.5).to(torch.bfloat16)
    y, ref = A.rms_norm(x, w, 1e-5), A.rms_norm_reference(x, w, 1e-5)
    test_dtype = y.dtype
    assert test_dtype == torch.bfloat16
    # both round x*rho to bf16, then w * that to bf16; rho may differ in the last float32 bit, so an
    # element may land one bf16 step away: at most 2 bf16 roundings of |y|
    assert ((y.float() - ref.float()).abs() <= 2 * EPS_BF16 * ref.float().abs() + 1e-30).all()


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_swiglu_kernel_equals_reference(interp, dtype):
    e, u, dh = (rand(3, 500, seed=s, dtype=dtype) for s in (6, 7, 8))   # 1500 = 2 programs, one masked
    ours = grads_of(A.swiglu, (e, u), dh)
    ref = grads_of(A.swiglu_reference, (e, u), dh)
    assert max_err(ours, ref) < 16 * torch.finfo(dtype).eps * 64        # elementwise, |values| < 64


@needs_triton
@pytest.mark.parametrize('batch_cos', [1, 2])
def test_rope_kernel_equals_reference(interp, batch_cos):
    q, dq = rand(2, 3, 5, 8, seed=9), rand(2, 3, 5, 8, seed=10)
    cos, sin = rand(batch_cos, 5, 8, seed=11), rand(batch_cos, 5, 8, seed=12)
    ours = grads_of(lambda q: A.rope(q, cos, sin), (q,), dq)
    ref = grads_of(lambda q: A.rope_reference(q, cos, sin), (q,), dq)
    assert max_err(ours, ref) < 8 * EPS64 * 16


def test_apply_rotary_pos_emb_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k, cos, sin = rand(2, 3, 5, 8, seed=1), rand(2, 2, 5, 8, seed=2), rand(2, 5, 8, seed=3), rand(2, 5, 8, seed=4)
    for ours, ref in zip(A.apply_rotary_pos_emb(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(ours, ref)                 # the PyTorch path is transformers' equation


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_cross_entropy_kernel_equals_torch(interp, monkeypatch, dtype, reduction):
    monkeypatch.setattr(A, '_CE_BLOCK', 128)          # V=300: three blocks per row, the last masked
    V = 300
    logits = rand(7, V, seed=13, dtype=dtype, scale=3)
    labels = torch.randint(0, V, (7,), generator=torch.Generator().manual_seed(14)); labels[2] = -100
    g = rand(7, seed=15) if reduction == 'none' else torch.tensor(1.7, dtype=torch.float64)
    ours = grads_of(lambda x: A.cross_entropy(x, labels, reduction=reduction), (logits,), g.to(dtype))
    ref = grads_of(lambda x: F.cross_entropy(x.double(), labels, reduction=reduction), (logits,), g)
    # a row's logsumexp sums V terms (relative error <= V eps), values up to ~20; 'sum' adds 7 rows
    bound = 20 * (V + 10) * torch.finfo(dtype).eps * g.abs().max().item() * (7 if reduction == 'sum' else 1)
    assert max_err(ours, ref) < bound
    assert ours[1][2].abs().max() == 0                # the ignored row gets no gradient


@needs_triton
def test_cross_entropy_kernel_bf16_logits(interp):
    V = 1000
    logits = rand(5, V, seed=16, dtype=torch.bfloat16, scale=3)
    labels = torch.randint(0, V, (5,), generator=torch.Generator().manual_seed(17))
    loss, grad = grads_of(lambda x: A.cross_entropy(x, labels), (logits,), torch.tensor(1.0, dtype=torch.bfloat16))
    ref_loss, ref_grad = grads_of(lambda x: F.cross_entropy(x.double(), labels), (logits,), torch.tensor(1.0, dtype=torch.float64))
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16   # float32 math, no float32 logits
    assert abs(loss.item() - ref_loss.item()) < 20 * V * EPS32
    # the gradient: float32 math, then one rounding to bf16
    assert ((grad.double() - ref_grad).abs() <= EPS_BF16 * ref_grad.abs() + 20 * V * EPS32 / 5).all()


def _fused_case(dtype, seed=18):
    h = rand(2, 9, 16, seed=seed, dtype=dtype)
    W, b = rand(300, 16, seed=seed + 1, dtype=dtype, scale=0.25), rand(300, seed=seed + 2, dtype=dtype)
    y = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(seed + 3)); y[0, :3] = -100
    return h, W, b, y


def _check_fused(dtype, reduction):
    h, W, b, y = _fused_case(dtype)
    g = torch.tensor(1.3, dtype=torch.float64)
    ours = grads_of(lambda h, W, b: A.fused_linear_cross_entropy(h, W, y, b, reduction=reduction, chunk_size=4),
                    (h, W, b), g.to(dtype))
    ref = grads_of(lambda h, W, b: F.cross_entropy((h.double() @ W.double().t() + b.double()).reshape(-1, 300),
                                                   y.reshape(-1), reduction=reduction), (h, W, b), g)
    # the logits: dot products of length d=16, then the V=300 logsumexp; values up to ~64; 'sum': 15 rows
    bound = (300 + 16) * torch.finfo(dtype).eps * 64 * (15 if reduction == 'sum' else 1)
    assert max_err(ours, ref) < bound


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_fused_linear_cross_entropy_pytorch_path(dtype, reduction):
    with A.triton_interpreter(False): _check_fused(dtype, reduction)


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_fused_linear_cross_entropy_kernel(interp, dtype, reduction):
    _check_fused(dtype, reduction)


@pytest.mark.parametrize('triton_on', [False, pytest.param(True, marks=needs_triton)])
def test_fused_linear_cross_entropy_per_token(triton_on):
    h, W, _, y = _fused_case(torch.float64)
    g = rand(2, 9, seed=30)
    with A.triton_interpreter(triton_on):
        ours = grads_of(lambda h: A.fused_linear_cross_entropy(h, W, y, reduction='none', chunk_size=5), (h,), g)
    ref = grads_of(lambda h: F.cross_entropy((h @ W.t()).reshape(-1, 300), y.reshape(-1), reduction='none').view(2, 9), (h,), g)
    assert max_err(ours, ref) < (300 + 16) * EPS64 * 64 * 4


def test_fused_linear_cross_entropy_keeps_no_logits():
    from fttk.lora import count_saved_bytes
    h = rand(64, 32, seed=31, dtype=torch.float32).requires_grad_()
    W, y = rand(1000, 32, seed=32, dtype=torch.float32), torch.randint(0, 1000, (64,))
    with count_saved_bytes() as ref: F.cross_entropy(h @ W.t(), y)
    with count_saved_bytes() as ours: A.fused_linear_cross_entropy(h, W, y)
    assert ours['bytes'] == 64 * 32 * 4 and ref['bytes'] >= 64 * 1000 * 4


def test_causal_lm_loss_equals_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss
    h, W, _, y = _fused_case(torch.float64)
    head = torch.nn.Linear(16, 300, bias=False, dtype=torch.float64)
    with torch.no_grad(): head.weight.copy_(W)
    for n in (None, torch.tensor(11)):
        ours = A.causal_lm_loss(h, head, y, num_items_in_batch=n)
        ref = ForCausalLMLoss(head(h), y, 300, num_items_in_batch=n)
        # transformers computes its loss in float32 (logits.float()); ours stays float64
        assert abs(ours.item() - ref.item()) < 316 * EPS32 * 64 * 15


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_lora_projection_kernel_equals_reference(interp, dtype):
    x, W, b = rand(2, 10, 24, seed=33, dtype=dtype), rand(40, 24, seed=34, dtype=dtype), rand(40, seed=35, dtype=dtype)
    Aw, Bw, dy = rand(5, 24, seed=36, dtype=dtype), rand(40, 5, seed=37, dtype=dtype), rand(2, 10, 40, seed=38, dtype=dtype)
    ours = grads_of(lambda x, a, bb: A.LoRAProjFunction.apply(x, W, b, a, bb, 0.5), (x, Aw, Bw), dy)
    ref = grads_of(lambda x, a, bb: x @ W.t() + b + 0.5 * (x @ a.t()) @ bb.t(), (x, Aw, Bw), dy)
    # dot products of length K + r = 29 (dx: N + r = 45; dA, dB: 20 rows), terms up to ~200
    assert max_err(ours, ref) < 45 * torch.finfo(dtype).eps * 200


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs_are_named():
    logits, W = torch.zeros(3, 5), torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"label 7 at row 1 is outside the vocabulary \[0, 5\) and is not ignore_index=-100"):
        A.cross_entropy(logits, torch.tensor([1, 7, -100]))
    with pytest.raises(ValueError, match=r"labels must hold one class per row: 3 rows, got labels of shape \(2,\)"):
        A.cross_entropy(logits, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        A.cross_entropy(logits, torch.tensor([1, 2, 3]), reduction='avg')
    with pytest.raises(ValueError, match=r"hidden size 3 does not match weight of shape \(5, 4\) \(vocab, hidden\)"):
        A.fused_linear_cross_entropy(torch.zeros(2, 3), W, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction='none' needs a frozen weight and bias"):
        A.fused_linear_cross_entropy(torch.zeros(2, 4), W.requires_grad_(), torch.tensor([0, 1]), reduction='none')
    with pytest.raises(ValueError, match=r"rope needs q of shape \(batch, heads, seq, head_dim\) with an even head_dim, got \(2, 3, 5, 7\)"):
        A.rope(torch.zeros(2, 3, 5, 7), torch.zeros(1, 5, 7), torch.zeros(1, 5, 7))
    with pytest.raises(ValueError, match="Linear has no ModuleList named 'layers' to checkpoint"):
        A.enable_offloaded_checkpointing(torch.nn.Linear(2, 2))


def test_load_model_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend 'deepspeed'; choose one of 'auto', 'fttk', 'hf', 'unsloth'"):
        A.load_model('test', 'deepspeed')
    with pytest.raises(ValueError, match="finetuning_type must be 'lora' or 'qlora', got 'full'"):
        A.load_model('test', 'fttk', 'full')
    with pytest.raises(ValueError, match=r"lora_dtype must be a floating torch.dtype \(peft's default: torch.float32\), got 'bf16'"):
        A.load_model('test', 'fttk', lora_dtype='bf16')
    with pytest.raises(ValueError, match="gradient_checkpointing must be False, True or 'offload', got 'unsloth'"):
        A.load_model('test', 'fttk', gradient_checkpointing='unsloth')


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unsloth_without_cuda_names_the_missing_requirement():
    with pytest.raises(RuntimeError, match=r"backend='unsloth' needs a CUDA GPU \(torch.cuda.is_available\(\) is False\); "
                                           r"use backend='fttk' or 'hf' here"):
        A.load_model('test', 'unsloth')
    assert A.resolve_backend('auto') == 'fttk'


# ------------------------------------------------------------------------------------ models
CFG = LoRAConfig(r=4, lora_alpha=8, target_modules='all-linear')
IDS = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
# float32 model: reductions of widths 128 and 344 and 24 positions per layer (2 layers), vocab 1024
REL = EPS32 * (2 * (128 + 344 + 24) + 1024)


def _fill(model, std=0.02):
    for n, p in model.named_parameters():
        if 'lora_' in n:
            key = n.replace('base_model.model.', '').replace('.default', '')
            with torch.no_grad(): p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(sum(map(ord, key)))) * std)
    return model


def _loss_grads(model, ids=IDS):
    set_seed(0); model.train(); model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n.replace('base_model.model.', '').replace('.default', ''): p.grad
                         for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope='module')
def hf_reference():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        m, tok = A.load_model('test', 'hf', lora_config=CFG)
    assert tok is not None
    return _loss_grads(_fill(m))


def _assert_same(run, ref):
    (l, g), (lr, gr) = run, ref
    assert abs(l - lr) <= REL * abs(lr)
    assert sorted(g) == sorted(gr)
    for k in g: assert (g[k] - gr[k]).abs().max().item() <= REL * gr[k].abs().max().item(), k


@pytest.mark.parametrize('kw', [{}, {'gradient_checkpointing': 'offload'}, {'gradient_checkpointing': True}],
                         ids=['plain', 'offload', 'checkpointing'])
def test_fttk_backend_equals_hf(hf_reference, kw):
    m, _ = A.load_model('test', 'fttk', lora_config=CFG, **kw)
    assert m.fttk_backend == 'fttk'
    _assert_same(_loss_grads(_fill(m)), hf_reference)


@pytest.fixture
def launched(monkeypatch):
    "The names of the kernels launched in the test."
    names, launch = [], A._launch
    def spy(kernel, *a, **k):
        names.append(getattr(kernel, 'fn', kernel).__name__); return launch(kernel, *a, **k)
    monkeypatch.setattr(A, '_launch', spy)
    return names


@needs_triton
def test_fttk_backend_with_kernels_equals_hf(hf_reference, launched):
    m, _ = A.load_model('test', 'fttk', lora_config=CFG, kernels=True)
    # float32 adapters on the float32 model: the fused q/k/v and MLP functions take the norms they
    # fold and the MLPs; the final norm, RoPE and the loss go to the kernels
    assert m.fttk_kernels == {'rms_norm': 1, 'swiglu': 0, 'rope': 2, 'lora': 0, 'loss': 1}
    with A.triton_interpreter():
        out = m(input_ids=IDS, labels=IDS)
        assert out.logits is None                     # the fused loss never made them
        run = _loss_grads(_fill(m))
    _assert_same(run, hf_reference)
    assert {'_rms_norm_fwd', '_rms_norm_bwd', '_rope_kernel', '_ce_kernel'} <= set(launched)


def test_offloaded_checkpointing_same_gradients_with_dropout():
    from fttk.world import base_model
    from fttk.lora import inject_lora
    model, _ = base_model('test', progress=False)
    inject_lora(model, LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules='all-linear'))
    _fill(model)
    plain = _loss_grads(model)
    assert A.enable_offloaded_checkpointing(model) == 2
    offl = _loss_grads(model)
    assert offl[0] == plain[0]                        # same dropout masks: bit for bit on CPU
    for k in plain[1]: assert torch.equal(offl[1][k], plain[1][k]), k
    A.enable_offloaded_checkpointing(model, False)
    assert not any('forward' in l.__dict__ for l in model.model.layers)


def test_lora_dtype_default_is_peft_default():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        for backend in ('hf', 'fttk'):
            m, _ = A.load_model('test', backend, lora_config=CFG, dtype=torch.bfloat16)
            assert {p.dtype for n, p in m.named_parameters() if 'lora_' in n} == {torch.float32}, backend
            m, _ = A.load_model('test', backend, lora_config=CFG, dtype=torch.bfloat16, lora_dtype=torch.bfloat16)
            assert {p.dtype for n, p in m.named_parameters() if 'lora_' in n} == {torch.bfloat16}, backend


@pytest.mark.parametrize('triton_on', [False, pytest.param(True, marks=needs_triton)])
def test_lora_projection_adapters_in_another_dtype(triton_on):
    "float32 x with float64 adapters (the bf16-model / float32-adapter case, one step up): plain matmuls."
    x, W = rand(2, 10, 24, seed=40, dtype=torch.float32), rand(40, 24, seed=41, dtype=torch.float32)
    Aw, Bw, dy = rand(5, 24, seed=42), rand(40, 5, seed=43), rand(2, 10, 40, seed=44, dtype=torch.float32)
    with A.triton_interpreter(triton_on):
        ours = grads_of(lambda x, a, bb: A.LoRAProjFunction.apply(x, W, None, a, bb, 0.5), (x, Aw, Bw), dy)
    ref = grads_of(lambda x, a, bb: x @ W.t() + (0.5 * (x.double() @ a.t()) @ bb.t()).float(), (x, Aw, Bw), dy)
    assert [t.dtype for t in ours] == [torch.float32, torch.float32, torch.float64, torch.float64]   # y, dx, dA, dB
    assert max_err(ours, ref) < 45 * EPS32 * 200


@needs_triton
def test_fttk_kernels_with_adapters_in_another_dtype_equal_hf(launched):
    "float64 adapters on the float32 model: the layers go through LoRAProjFunction, as peft casts x."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        ref = _loss_grads(_fill(A.load_model('test', 'hf', lora_config=CFG, lora_dtype=torch.float64)[0]))
    m, _ = A.load_model('test', 'fttk', lora_config=CFG, lora_dtype=torch.float64, kernels=True)
    assert sum(getattr(l, 'forward', None) is not None and 'forward' in l.__dict__
               for l in m.modules() if type(l).__name__ == 'LoRALinear') == 14
    assert m.fttk_kernels == {'rms_norm': 5, 'swiglu': 2, 'rope': 2, 'lora': 14, 'loss': 1}
    with A.triton_interpreter(): run = _loss_grads(_fill(m))
    _assert_same(run, ref)
    assert {'_rms_norm_fwd', '_swiglu_fwd', '_swiglu_bwd', '_rope_kernel', '_ce_kernel'} <= set(launched)


def test_fttk_qlora_equals_lora_on_the_dequantized_model():
    "QLoRA = LoRA on the NF4-rounded weights (fttk.quant is bit-exact with bitsandbytes: tests/test_quant.py)."
    from fttk.quant import NF4Linear
    q, _ = A.load_model('test', 'fttk', 'qlora', CFG)
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, NF4Linear)}
    assert len(quantized) == 14                        # all seven projections of both layers
    m, _ = A.load_model('test', 'fttk', lora_config=CFG)
    with torch.no_grad():
        for n, layer in quantized.items():
            m.get_submodule(n.replace('.base_layer', '') + '.base_layer').weight.copy_(layer.dequantize_weight())
    _assert_same(_loss_grads(_fill(q)), _loss_grads(_fill(m)))


def test_unsloth_not_installed_names_the_package(monkeypatch):
    "A CUDA machine without unsloth: the error names the package and the extra that brings it."
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'unsloth' else find_spec(name, *a))
    with pytest.raises(RuntimeError, match=r"backend='unsloth' needs the unsloth package \(pip install 'fttk\[gpu\]'\); "
                                           r"use backend='fttk' or 'hf' here"):
        A.resolve_backend('unsloth')
    assert A.resolve_backend('auto') == 'fttk'


def test_unsloth_refuses_a_loaded_model(monkeypatch):
    monkeypatch.setattr(A, 'unsloth_available', lambda: None)      # as on a CUDA machine with unsloth
    with pytest.raises(ValueError, match="backend='unsloth' loads by name .*: pass a model name or folder, not a loaded model"):
        A.load_model(torch.nn.Linear(2, 2), 'unsloth')


# The trainers take their backend from one place, TrainingConfig.backend, and their LoRA model from
# load_model(model, cfg.backend, 'lora', lora_cfg, fast_lora=...). On a CPU 'auto' must be the computation
# the trainers ran before (inject_lora; SFT's loop then enable_fast_lora), bit for bit.

def test_training_config_backend_field():
    import typing
    from fttk.core import ConfigError
    from fttk.sft import TrainingConfig, SFTConfig
    from fttk.reward import RewardConfig
    assert typing.get_args(typing.get_type_hints(TrainingConfig)['backend']) == A.BACKENDS    # one list
    assert {c().backend for c in (TrainingConfig, SFTConfig, RewardConfig)} == {'auto'}
    assert RewardConfig(backend='hf').backend == 'hf'
    with pytest.raises(ConfigError, match=r"config field 'backend' must be one of \['auto', 'fttk', 'hf', 'unsloth'\], "
                                          r"got 'cuda'"):
        SFTConfig(backend='cuda')


@pytest.mark.parametrize('backend', ['hf', 'unsloth'])
@pytest.mark.parametrize('cls', ['PPOConfig', 'DPOConfig'])
def test_reference_trainers_refuse_peft_backends(cls, backend):
    "PPO and DPO take the policy with adapters off as the reference (lora_disabled: fttk's LoRA layers only)."
    from fttk.core import ConfigError
    import fttk.ppo, fttk.dpo
    C = getattr(fttk.ppo, cls, None) or getattr(fttk.dpo, cls)
    with pytest.raises(ConfigError, match=rf"backend='{backend}' is not supported by {cls}: its reference is the policy "
                                          r"with adapters off \(fttk.lora.lora_disabled\), which knows fttk's LoRA "
                                          r"layers only, not peft's; use backend='fttk' or 'auto'"):
        C(backend=backend)
    assert C(backend='fttk').backend == 'fttk' and C().backend == 'auto'


def test_auto_on_a_loaded_model_is_fttk(monkeypatch):
    "Unsloth loads by name: given a loaded model (the trainers' case), 'auto' is fttk even where unsloth runs."
    monkeypatch.setattr(A, 'unsloth_available', lambda: None)      # as on a CUDA machine with unsloth
    assert A.resolve_backend('auto') == 'unsloth'
    m, _ = A.load_model(_tiny_lm(), 'auto', lora_config=CFG, kernels=False)
    assert m.fttk_backend == 'fttk'


def _tiny_lm():
    from fttk.world import base_model
    return copy.deepcopy(base_model('test', progress=False)[0])


def _adamw_steps(model, n=3):
    "Losses of n AdamW steps on a fixed batch, and the trainable weights after them."
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(n):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    return losses, {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def test_auto_on_cpu_equals_inject_lora_bit_for_bit():
    "Reward, PPO and DPO: load_model(model, 'auto', 'lora', cfg, fast_lora=False) is inject_lora(model, cfg)."
    from fttk.lora import inject_lora, lora_disabled, lora_layers
    a, b = _tiny_lm(), _tiny_lm()
    set_seed(0); inject_lora(a, CFG)
    set_seed(0); b, _ = A.load_model(b, 'auto', 'lora', CFG, fast_lora=False)
    assert b.fttk_backend == 'fttk' and b.fttk_kernels == {} and len(lora_layers(b)) == 14
    (la, wa), (lb, wb) = _adamw_steps(a), _adamw_steps(b)
    assert la == lb and la[-1] < la[0]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad(), lora_disabled(b):      # the PPO/DPO reference still works: adapters off = base
        assert torch.equal(b(input_ids=ids).logits, _tiny_lm()(input_ids=ids).logits)


def test_sft_with_load_model_equals_inject_lora_bit_for_bit(tmp_path):
    "SFT: load_model(..., fast_lora=cfg.use_fast_lora) then sft_train is inject_lora then sft_train."
    from fttk.lora import inject_lora
    from fttk.sft import SFTConfig, sft_train, trainable_state
    from fttk.world import base_model, lab_world
    tok = base_model('test', progress=False)[1]
    rows = [r for r in lab_world('test').instruction_rows() if r['task'] == 'qa'][:24]
    kw = dict(learning_rate=1e-3, max_steps=3, per_device_train_batch_size=8, max_length=128, seed=0)
    a, b = _tiny_lm(), _tiny_lm()
    set_seed(0); inject_lora(a, CFG)
    cfg = SFTConfig(output_dir=str(tmp_path/'b'), **kw)
    set_seed(0); b, _ = A.load_model(b, cfg.backend, 'lora', CFG, tokenizer=tok, fast_lora=cfg.use_fast_lora)
    ra = sft_train(a, tok, rows, SFTConfig(output_dir=str(tmp_path/'a'), **kw), progress=False)
    rb = sft_train(b, tok, rows, cfg, progress=False)
    assert [r['loss'] for r in ra['log']] == [r['loss'] for r in rb['log']] and len(ra['log']) == 3
    sa, sb = trainable_state(a), trainable_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
