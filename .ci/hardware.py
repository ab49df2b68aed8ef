"""One line for the CI log: which hardware-dependent code paths this machine could not exercise.

fttk's results and speed depend on the CPU's instruction sets (AVX-512 changes float32 summation order,
AVX512-bf16 switches bitsandbytes to a repacked 4-bit kernel and makes bf16 training fast, AMX likewise)
and on a CUDA GPU. A green run on one machine says nothing about the paths it did not take."""
import torch

from fttk.core import cpu_features

PATHS = {'avx512f': 'AVX-512 float32 kernels', 'avx512_bf16': "AVX512-bf16 (bitsandbytes' repacked 4-bit kernel, fast bf16)",
         'amx': 'AMX tiles'}

if __name__ == '__main__':
    f = cpu_features()
    missing = [v for k, v in PATHS.items() if not f[k]]
    if not torch.cuda.is_available(): missing.append('CUDA (GPU tests and the Unsloth path)')
    have = [k for k in ('avx2', 'avx512f', 'avx512_bf16', 'amx') if f[k]]
    print(f"hardware: {f['cpu_model']}, flags {'+'.join(have) or 'none'}, torch kernels {f['torch_cpu_capability']}; "
          + (f"not exercised here: {'; '.join(missing)}" if missing else 'every hardware path fttk knows was exercised'))
