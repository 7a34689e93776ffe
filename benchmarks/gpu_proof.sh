#!/usr/bin/env bash
# The GPU proof in one call on a lent machine (no network): install the carried wheels, then run each
# section of benchmarks/gpu_proof.py in its own process and time budget, results under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_proof.sh            # on the device, from the repository root
#
# Wheels (.whl/, git-ignored): bitsandbytes, trl, datasets (+ dill, multiprocess), pydantic (+ core, types),
# llmcompressor, compressed-tensors, loguru, auto-round; benchmarks/RESULTS.md says which versions ran.
set -u
OUT=${OUT:-/tmp/gpu-proof/out}; WORK=${WORK:-/tmp/gpu-proof}; DEADLINE=${DEADLINE:-540}
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export GAUNTLET_HOME=$WORK/home GAUNTLET_QUANT_VENV=$WORK/quantize-venv
SITE=/tmp/site:$PWD   # PYTHONPATH of every section; not of the quantize venv's pip (it would see /tmp/site's
                      # packages as installed and skip them, and the quantizer runs isolated from PYTHONPATH)

# The quantize stage's environment, as gauntlet/envs.py would make it, from the carried wheels: the image's
# torch and transformers (5.17, llm-compressor's ceiling; its site-packages through a .pth, the image's python
# being a venv itself) plus llm-compressor and its pins.
if [ ! -x "$GAUNTLET_QUANT_VENV/bin/python" ]; then
  python3 -m venv "$GAUNTLET_QUANT_VENV" \
  && python3 -c "import site, torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))" \
       > "$("$GAUNTLET_QUANT_VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/image.pth" \
  && "$GAUNTLET_QUANT_VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl \
  && PYTHONPATH=$SITE python3 -c "
import json; from gauntlet.envs import QUANTIZE_ENV; from gauntlet.hashing import sha256_json
w = QUANTIZE_ENV.wanted(); (QUANTIZE_ENV.path() / 'gauntlet-env.json').write_text(json.dumps({'fingerprint': sha256_json(w), **w}))"
fi

run() {  # run SECTION SECONDS [args]: skipped when the call's deadline leaves too little time
  local section=$1 limit=$2; shift 2
  case " ${SKIP:-} " in *" $section "*) echo "[gpu-proof] $section skipped (SKIP)"; return;; esac
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  [ "$left" -lt 30 ] && { echo "[gpu-proof] $section skipped: ${left}s left"; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu-proof] $section (up to ${limit}s)"
  PYTHONPATH=$SITE timeout -k 10 "$limit" python3 -m benchmarks.gpu_proof "$section" --work "$WORK" --out "$OUT" "$@" \
    || echo "[gpu-proof] $section ended with $?"
}
run env 40
run models 150
run train 150 --steps 2                                  # the micro-batch `gauntlet plan` proposes
run train 90 --steps 3 --batch ${SAME_BATCH:-16} --tag same   # the batch TRL runs too
run trl 120 --steps 3 --batch ${SAME_BATCH:-16}
run quant 150 --budget 140
run decode 90
run compiled 150
PYTHONPATH=$SITE python3 -m benchmarks.gpu_proof report --work "$WORK" --out "$OUT"
echo "[gpu-proof] done in $(( $(date +%s) - START ))s"
