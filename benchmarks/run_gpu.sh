#!/usr/bin/env bash
# The GPU benchmark (benchmarks/bench_gpu.py's docstring says what is measured), in one script. From the repo root:
#     bash benchmarks/run_gpu.sh
# on a CUDA machine with Python 3.12 and no network. The package bundle (unsloth, bitsandbytes, ...) comes from
# the shared gpu/ folder: GPU_BUNDLE, else shared/gpu or ../shared/gpu beside the repo (bundle/site.tar.gz,
# listed in bundle/MANIFEST.txt). fttk is imported from this checkout (FTTK_SRC overrides).
# Writes $OUT/results.jsonl (one JSON line per case, failures included) and $OUT/log.txt (everything), and
# prints the table with ratios to hf_peft. Each case runs in its own process with its own timeout; a global budget
# (BUDGET seconds, default 330) skips the cases that would run past it, so the script ends in under 6 minutes.
# Knobs: CASES="hf_peft fttk ...", BUDGET, CASE_TIMEOUT, MODEL, PY, BENCH_ARGS="--tiny --device cpu" (CPU dry run).
set -uo pipefail
T_START=$(date +%s)
HERE=$(cd "$(dirname "$0")" && pwd)            # benchmarks/
REPO=$(cd "$HERE/.." && pwd)
GPU_BUNDLE=${GPU_BUNDLE:-$(for d in "$REPO/shared/gpu" "$REPO/../shared/gpu" "$REPO/../../shared/gpu"; do
  [ -f "$d/bundle/site.tar.gz" ] && { cd "$d" && pwd; break; }; done)}
OUT=${OUT:-/tmp/bench_out}
PY=${PY:-python3}
BUDGET=${BUDGET:-330}
BENCH_ARGS=${BENCH_ARGS:-}
case " $BENCH_ARGS " in *" --tiny "*) MODEL=${MODEL:-/tmp/llama_tiny} ;; *) MODEL=${MODEL:-/tmp/llama1b} ;; esac
CASES=${CASES:-hf_peft fttk fttk_offload hf_peft_gc fttk_bf16 fttk_gc hf_qlora_gc fttk_qlora unsloth unsloth_nogc unsloth_qlora}   # Unsloth last: it patches at import, its first case compiles
SITE=/tmp/site                          # the bundle unpacks into /tmp/site and /tmp/site_opt
WORK=${WORK:-/tmp/bench_work}           # cwd of the cases (unsloth_compiled_cache lands here)
B="$HERE/bench_gpu.py"
mkdir -p "$OUT" "$WORK"
RES=$OUT/results.jsonl LOG=$OUT/log.txt
: > "$RES"; : > "$LOG"
elapsed() { echo $(( $(date +%s) - T_START )); }
say() { echo "[run.sh +$(elapsed)s] $*" | tee -a "$LOG"; }
cap() {  # per-case timeout in seconds (the first Unsloth case also compiles its Triton kernels); CASE_TIMEOUT overrides
  [ -n "${CASE_TIMEOUT:-}" ] && { echo "$CASE_TIMEOUT"; return; }
  case $1 in unsloth) echo 150 ;; unsloth_*) echo 120 ;; *qlora*) echo 100 ;; fttk*) echo 90 ;; *) echo 80 ;; esac; }

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1
unset PYTHONDONTWRITEBYTECODE        # the first import of unsloth writes .pyc files under /tmp/site; later cases reuse them
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=${HF_HOME:-/tmp/hf_home}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}   # shared by the cases: only the first compiles

say "environment"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "python: $(command -v $PY) $($PY -V 2>&1) | nproc $(nproc) | CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES-unset}"
  $PY -m pip show peft 2>&1 | head -2
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "| transformers", transformers.__version__)'
} 2>&1 | tee -a "$LOG"

say "unpack the bundle into $SITE"
rm -rf "$SITE" "${SITE}_opt"
if [ -n "$GPU_BUNDLE" ]; then tar -xzf "$GPU_BUNDLE/bundle/site.tar.gz" -C /tmp || say "UNPACK FAILED"
else say "no package bundle found (set GPU_BUNDLE): the unsloth and bitsandbytes cases need them installed"; fi
FTTK_SRC=${FTTK_SRC:-$REPO}
PP=$(env -u PYTHONPATH $PY "$B" pythonpath "$SITE" "${SITE}_opt" --extra "$FTTK_SRC${PYTHONPATH:+:$PYTHONPATH}" 2>>"$LOG")
export PYTHONPATH=${PP:-$SITE:$FTTK_SRC}
say "PYTHONPATH=$PYTHONPATH"
$PY "$B" env >> "$LOG" 2>&1

say "import unsloth (background) while the model is made"
(cd "$WORK" && timeout -k 5 90 $PY -c 'import time; t = time.time(); import unsloth; print("import unsloth OK", unsloth.__version__, "in %.1fs" % (time.time() - t))') > "$WORK/import_unsloth.log" 2>&1 &
IMPORT_PID=$!
if [ -f "$MODEL/config.json" ] && [ -f "$MODEL/tokenizer.json" ] && ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
  say "model already at $MODEL"
else
  timeout -k 5 150 $PY "$B" make-model "$MODEL" $BENCH_ARGS 2>&1 | tee -a "$LOG" | grep -E '^\{|Error' || say "make-model FAILED"
fi
wait $IMPORT_PID; say "import unsloth: exit $?"
{ echo "----- import unsloth"; cat "$WORK/import_unsloth.log"; } >> "$LOG"
grep -E "import unsloth OK|Error|Traceback" "$WORK/import_unsloth.log" | tail -5

for c in $CASES; do
  left=$(( BUDGET - $(elapsed) - 5 )); t=$(cap "$c"); (( t > left )) && t=$left
  if (( t < ${MIN_CASE_S:-30} )); then
    say "$c: SKIPPED (time budget of ${BUDGET}s spent)"
    $PY "$B" fail-line "$c" "skipped: run.sh budget of ${BUDGET}s spent" >> "$RES"; continue
  fi
  say "$c (timeout ${t}s)"
  n0=$(wc -l < "$RES")
  (cd "$WORK" && timeout -k 10 "$t" $PY "$B" case "$c" --model "$MODEL" --out "$RES" $BENCH_ARGS) > "$WORK/$c.log" 2>&1
  rc=$?
  { echo "----- case $c (exit $rc)"; cat "$WORK/$c.log"; } >> "$LOG"
  if [ "$(wc -l < "$RES")" = "$n0" ]; then
    $PY "$B" fail-line "$c" "process exit $rc (124/137: killed at the ${t}s case timeout)" --log "$WORK/$c.log" >> "$RES"
  fi
  say "$c: exit $rc"
done

say "done"
$PY "$B" summary "$RES" 2>&1 | tee -a "$LOG"
