#!/usr/bin/env bash
# The times and demo figures the README's Quick start and paper sections state, measured on this machine:
#   bash bench/first_hour.sh [quickstart] [paper_small] [suite] [paper]      (default: the first three)
# quickstart:  bash train.sh indomain && bash test.sh indomain, as a first user runs it (the demo set built
#              too), then the demo figures from its Brain results.json;
# paper_small: EPOCH=2 IMAGE_SIZE=224 bash train.sh paper && BOOTSTRAP=100 bash test.sh paper (README's small run);
# suite:       python -m pytest -q;
# paper:       bash train.sh paper && bash test.sh paper (the whole demo paper protocol: long on a CPU).
# Each runs under /usr/bin/time in fresh folders under a temp dir (WORK, kept with KEEP=1), never touching
# checkpoint/, results/ or data/demo; the end prints the README's lines. Run it on a quiet machine: the
# wall time counts whatever else runs, the CPU time (user+system, all processes) does not.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=("$@"); (( ${#STEPS[@]} )) || STEPS=(quickstart paper_small suite)
for step in "${STEPS[@]}"; do
  case $step in quickstart|paper_small|suite|paper) ;;
    *) echo "error: unknown step '$step': choose quickstart, paper_small, suite or paper" >&2; exit 2 ;; esac
done
WORK=${WORK:-$(mktemp -d /tmp/medvmad_first_hour.XXXXXX)}; mkdir -p "$WORK"
[[ -n ${KEEP:-} ]] || trap 'rm -rf "$WORK"' EXIT
MACHINE="$(nproc)-core CPU machine ($(date +%Y-%m-%d))"
export DATA_ROOT=$WORK/no-bmad DEMO_ROOT=$WORK/demo   # the demo set, built by the first step that needs it
SUMMARY=()

measure() {  # measure NAME COMMAND: run COMMAND under /usr/bin/time, log in WORK/NAME.log, remember its times
  local name=$1; shift
  echo "== $name: $*"
  /usr/bin/time -f "%e %U %S" -o "$WORK/$name.time" bash -c "$*" > "$WORK/$name.log" 2>&1 \
    || { echo "$name failed; its log: $WORK/$name.log"; tail -n 20 "$WORK/$name.log"; KEEP=1; trap - EXIT; exit 1; }
  read -r wall user system < <(tail -n 1 "$WORK/$name.time")
  echo "   $(python -c "print(f'{$wall:.0f} s wall {$user:.0f}+{$system:.0f} s CPU')")"
  SUMMARY+=("$name: on a $MACHINE: $(python -c "
minutes = lambda s: f'{s / 60:.1f}' if s < 600 else f'{s / 60:.0f}'
print(f'about {minutes($wall)} min wall, {minutes($user + $system)} min CPU')")")
}

for step in "${STEPS[@]}"; do
  case $step in
    quickstart)
      export SAVE_ROOT=$WORK/quickstart/checkpoint RESULTS=$WORK/quickstart/results
      measure quickstart "bash train.sh indomain && bash test.sh indomain"
      python - "$RESULTS/indomain/Brain/results.json" <<'EOF'
import json, sys
values = json.load(open(sys.argv[1]))["datasets"]["Brain"]
for key, title in (("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "AUPRO"), ("image_auroc", "image AUROC")):
    low, high = values[f"{key}_ci"]
    print(f"   demo Brain test {title}: about {100 * values[key]:.1f} [95% interval {100 * low:.1f}\u2013{100 * high:.1f}]")
EOF
      ;;
    paper_small)
      export SAVE_ROOT=$WORK/paper_small/checkpoint RESULTS=$WORK/paper_small/results
      measure paper_small "EPOCH=2 IMAGE_SIZE=224 bash train.sh paper && BOOTSTRAP=100 bash test.sh paper" ;;
    paper)
      export SAVE_ROOT=$WORK/paper/checkpoint RESULTS=$WORK/paper/results
      measure paper "bash train.sh paper && bash test.sh paper" ;;
    suite)
      measure suite "env -u SAVE_ROOT -u RESULTS -u DATA_ROOT -u DEMO_ROOT python -m pytest -q" ;;
  esac
done
echo
echo "README lines:"
printf '  %s\n' "${SUMMARY[@]}"
