#!/usr/bin/env bash
# The text-rendering ablation on one GPU: every trial of a trials file trains with
# `charred.main` and is scored with `charred.evaluate`, N at a time on the one device.
#   benchmarks/text_rendering_gpu.sh TRIALS_FILE OUT_DIR [PARALLEL]
# A trials line is `name<TAB>gin bindings separated by spaces`; '#' lines are skipped.
# Writes OUT_DIR/<name>.json (evaluate's JSON line plus wall seconds) and <name>.log.
# COMMON_BINDINGS (space-separated) are bound in every trial before its own.
set -uo pipefail
trials=$1; out=$2; parallel=${3:-4}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the device
run_trial() {
  local name=$1; shift
  local dir=/tmp/runs/$name start=$SECONDS
  local flags=()
  for b in ${COMMON_BINDINGS:-} "$@"; do flags+=("--gin.$b"); done
  {
    python3 -m charred.main --gin_file=experiments/typography_tiny.gin \
        --gin.experiment.DataConfig.source="'render'" --workdir="$dir" "${flags[@]}" &&
    python3 -m charred.evaluate --workdir="$dir" --samples_png="$out/$name.png" > "$dir/eval.json"
  } > "$out/$name.log" 2>&1
  local rc=$?
  python3 - "$dir/eval.json" "$out/$name.json" "$rc" "$((SECONDS - start))" "$*" <<'PY'
import json, sys
src, dst, rc, secs, bindings = sys.argv[1:]
try:
  result = json.loads(open(src).read().strip().splitlines()[-1])
except Exception:  # pylint: disable=broad-except
  result = {}
result.update(rc=int(rc), wall_seconds=int(secs), bindings=bindings)
json.dump(result, open(dst, 'w'), sort_keys=True)
PY
  echo "$name rc=$rc $((SECONDS - start))s $(head -c 300 "$out/$name.json")"
}
while IFS=$'\t' read -r name bindings; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  while (( $(jobs -rp | wc -l) >= parallel )); do wait -n; done
  run_trial "$name" $bindings &
done < "$trials"
wait
