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
