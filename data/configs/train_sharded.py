"""Train the fttk lab model data-parallel on several GPUs; the same script runs under accelerate's FSDP or DeepSpeed ZeRO.

    accelerate launch --config_file data/configs/accelerate_fsdp.yaml data/configs/train_sharded.py
    accelerate launch --config_file data/configs/accelerate_deepspeed.yaml data/configs/train_sharded.py

Needs CUDA GPUs (and `pip install deepspeed` for the second line). It prints each rank's peak allocated memory
next to `fttk memory`'s prediction for the same question, so the accountant can be checked on real hardware.
"""
import argparse

import torch
from accelerate import Accelerator
from transformers import LlamaForCausalLM

from fttk.core import set_seed
from fttk.memory import GB, MemoryConfig, estimate_memory, lab_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--size', default='default', help='lab model size: test or default')
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--batch', type=int, default=8, help='per-device batch size')
    ap.add_argument('--seq', type=int, default=128)
    ap.add_argument('--lr', type=float, default=1e-3)
    args = ap.parse_args()

    acc = Accelerator()                       # mixed precision, FSDP or DeepSpeed come from the launch config
    set_seed(0)
    config = lab_config(args.size)
    model = LlamaForCausalLM(config)          # random init: memory does not depend on the weights' values
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, opt = acc.prepare(model, opt)
    g = torch.Generator().manual_seed(1 + acc.process_index)
    for step in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).to(acc.device)
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        opt.step(); opt.zero_grad(set_to_none=True)
        if step % 5 == 0: acc.print(f"step {step} loss {loss.item():.4f}")

    stage = {'FSDP': 3, 'DEEPSPEED': acc.state.deepspeed_plugin.zero_stage if acc.state.deepspeed_plugin else 0}.get(
        acc.distributed_type.name, 0)
    dtype = 'mixed' if acc.mixed_precision in ('bf16', 'fp16') else 'fp32'
    est = estimate_memory(MemoryConfig(config=f'lab:{args.size}', stage=stage, ranks=acc.num_processes, dtype=dtype,
                                       batch=args.batch, seq=args.seq))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else float('nan')
    print(f"rank {acc.process_index} ({acc.distributed_type.name}, stage {stage}, {acc.num_processes} ranks, {dtype}): peak allocated {peak/GB:.3f} GB; fttk memory predicts {est.total/GB:.3f} GB "
          f"(model states {est.model_states/GB:.3f} GB)")


if __name__ == '__main__':
    main()
