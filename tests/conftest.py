"""Suite-wide pytest hooks.

`reference`: the modules that check fttk against the library it reimplements (peft, trl, bitsandbytes,
HF tokenizers/transformers, evaluate/rouge/sacrebleu, accelerate's memory estimates). `.ci/run` runs them
again under the lowest versions pyproject admits and under the versions unsloth pins, so the declared
ranges stay true.
"""
import pytest

REFERENCE_MODULES = {'test_lora', 'test_quant', 'test_sft', 'test_tokenization', 'test_metrics', 'test_memory'}

def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit('.', 1)[-1] in REFERENCE_MODULES:
            item.add_marker(pytest.mark.reference)


def _nan_logits_after(model, n: int):
    "`model`, patched so that its logits are NaN from its (n+1)-th forward call on: a bad batch mid-run."
    calls, orig = {'n': 0}, model.forward
    def forward(*a, **k):
        out = orig(*a, **k); calls['n'] += 1
        if calls['n'] > n: out.logits = out.logits * float('nan')
        return out
    model.forward = forward
    return model


@pytest.fixture
def nan_logits_after():
    "The NaN-guard tests of every trainer use this to make the loss NaN after a few good steps."
    return _nan_logits_after
