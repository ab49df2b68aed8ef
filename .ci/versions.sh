#!/usr/bin/env bash
# The declared dependency ranges must be true: rerun the reference-equality tests (marker `reference`,
# set in tests/conftest.py) in two more environments, each with exact pins from a committed constraints file:
#   lowest   .ci/constraints-lowest.txt   every direct dependency at the lowest version pyproject admits
#   unsloth  .ci/constraints-unsloth.txt  what unsloth (the `gpu` extra) pins: transformers 5.17, trl 1.15,
#                                         datasets<5
# Called by .ci/run (after the main pytest: the tests load the cached 'test' base model); also runs alone:
#   bash .ci/versions.sh [lowest|unsloth ...]
# The venvs (.venv-lowest, .venv-unsloth) are cached across runs like .venv. Regenerate a constraints file after
# changing pyproject's ranges (uv from `pip install uv`; nvidia-*/triton lines are dropped: CPU torch needs none):
#   uv pip compile pyproject.toml --python-version 3.11 --override <(echo torch==2.13.0) --no-header \
#     --no-annotate --resolution lowest-direct -o .ci/constraints-lowest.txt     # then pyarrow==25.0.1, see header
#   uv pip compile pyproject.toml --python-version 3.11 --override <(echo torch==2.13.0) --no-header \
#     --no-annotate -c <(printf '%s\n' 'transformers==5.17.*' 'trl==1.15.*' 'datasets<5' 'peft>=0.18' \
#     'bitsandbytes>=0.45.5,!=0.46.0,!=0.48.0') -o .ci/constraints-unsloth.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# trl 1.15's SFTTrainer computes the loss only with Triton kernels (trl/trainer/utils.py
# _ChunkedLogProbFunction; trl 1.16 added the CPU fallback): a CPU-only torch has no Triton, so the TRL run of
# this test cannot train here. unsloth runs on CUDA, where torch ships Triton.
declare -A SKIP=([unsloth]="--deselect tests/test_sft.py::test_ours_equals_trl" [lowest]="")

rc=0
for SET in "${@:-lowest unsloth}"; do
  for S in $SET; do
    T0=$(date +%s)
    V=.venv-$S
    [ -x "$V/bin/python" ] || "$PY" -m venv "$V"
    # torch==2.13.0 in the same call and --no-compile: see the install phase of .ci/run
    "$V/bin/pip" install -q --no-compile -c ".ci/constraints-$S.txt" torch==2.13.0 -e . \
      pytest pytest-timeout hypothesis rouge-score sacrebleu
    T1=$(date +%s)
    echo "--- $S: $("$V/bin/pip" list --format=freeze 2>/dev/null | grep -iE \
      '^(transformers|trl|peft|datasets|accelerate|bitsandbytes|evaluate|tokenizers)==' | tr '\n' ' ')"
    [ -z "${SKIP[$S]}" ] || echo "--- $S: ${SKIP[$S]} (trl 1.15 needs Triton to train: see .ci/versions.sh)"
    # -m replaces pyproject's addopts `-m 'not slow'`, so keep slow tests out here too
    "$V/bin/pytest" -q -p no:cacheprovider -m 'reference and not slow' ${SKIP[$S]} || rc=1
    echo "--- $S: install $((T1 - T0))s, tests $(( $(date +%s) - T1 ))s"
  done
done
exit "$rc"
