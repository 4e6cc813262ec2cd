#!/usr/bin/env bash
# One command that proves every fast path on a CUDA GPU and measures the speed targets, sized for one call of
# at most 9 minutes on an H100 (set-up from carried wheels included). Steps, most important first, each with its
# own time limit, each skipped when a step it needs did not succeed:
#
#   setup              install the carried wheels (.gpu_check/wheels); ddpmlab from src/ unless installed
#   env                GPU, driver, torch / CUDA / cuDNN and package versions
#   pytest_gpu         python -m pytest -m gpu (the tests that need CUDA), in the background beside the
#                      next steps (none of them is timed), joined before the benchmarks
#   train_cli          python train.py: trainer=gpu_fast, every perf lever forced on, the GPU-resident data path,
#                      unet_small on the real MNIST files (.gpu_check/data), a few hundred steps
#   loss_curve         train/loss falls over that run (metrics.csv)
#   sample_cli         python sample.py on its checkpoint: DDIM-50 with the fast sampling path, and the same
#                      samples in fp32 eager (every lever off): max and mean |difference|
#   evaluate_bpd       python evaluate.py: bits/dim on a few held-out images (in the background beside sample_cli)
#   train_throughput   bench/train_throughput.py: Trainer path, bare loop, diffusers peer (35.7M U-Net, batch 128)
#   sample_throughput  bench/sample_throughput.py: DDIM-50 at batch 256, ddpmlab and the diffusers peer
#
# Everything goes to $OUT (a temporary folder when OUT is unset) as it happens: summary.json (rewritten after
# every step, so a run cut off by its time limit keeps every finished step), gpu_check.log (all output),
# sample_grid.png, train_grid.png, metrics.csv. A summary line per step goes to stdout.
#
#   bash bench/gpu_check.sh                   # on the GPU machine (see bench/README.md for the device call)
#   bash bench/gpu_check.sh --cpu             # dry run at tiny sizes on a CPU (tests/test_gpu_check.py)
#   bash bench/gpu_check.sh --only train_throughput,sample_throughput     # rerun some steps (setup and env
#                                             always run; a step whose prerequisite is not selected is skipped)
#
# Options: --cpu; --only STEP[,STEP]; --budget SECONDS (the whole run, default 530 on a GPU, 400 on a CPU);
# --data-root DIR (holds MNIST/raw/; default .gpu_check/data on a GPU, scikit-learn's digits on a CPU).
# Exit status: 0 when no step failed or timed out, else 1.
set -uo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}

mode=cuda only="" budget="" data_root=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu; shift ;;
    --only) only=",$2,"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --data-root) data_root=$(cd "$CALLER_DIR" && realpath -m "$2"); shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$mode" = cuda ] && : "${budget:=530}" "${data_root:=$REPO/.gpu_check/data}"
[ "$mode" = cpu ] && : "${budget:=400}"

OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d -t gpu_check_work.XXXXXX)
SUMMARY=$OUT/summary.json
LOG=$OUT/gpu_check.log
: > "$LOG"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1 WANDB_MODE=disabled
[ "$mode" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
START=$SECONDS
DEADLINE=$((START + ${budget%.*}))
RESERVE=15            # seconds kept for the summary at the end
declare -A STATUS

steps() { "$PY" "$REPO/bench/gpu_check_steps.py" "$@"; }

# tmo CMD...: run CMD within what is left of the current step's time limit.
tmo() {
  local left=$((STEP_DEADLINE - SECONDS))
  [ "$left" -lt 1 ] && return 124
  timeout --kill-after=5 "$left" "$@"
}

# may_run NAME LIMIT_S MIN_S "PREREQ ...": whether the step runs (else it is recorded as skipped, with the
# reason); sets STEP_LIMIT to its limit within what is left of the whole budget.
may_run() {
  local name=$1 limit=$2 min=$3 prereqs=$4 p left
  if [ -n "$only" ] && [[ "$only" != *",$name,"* ]] && [ "$name" != setup ] && [ "$name" != env ]; then
    STATUS[$name]=skipped
    steps record "$SUMMARY" --name "$name" --status skipped --reason "not in --only"
    return 1
  fi
  for p in $prereqs; do
    if [ "${STATUS[$p]:-}" != ok ]; then
      STATUS[$name]=skipped
      steps record "$SUMMARY" --name "$name" --status skipped --reason "needs $p, which is ${STATUS[$p]:-not run}"
      printf '%-18s skipped (needs %s)\n' "$name" "$p"
      return 1
    fi
  done
  left=$((DEADLINE - RESERVE - SECONDS))
  if [ "$left" -lt "$min" ]; then
    STATUS[$name]=skipped
    steps record "$SUMMARY" --name "$name" --status skipped --reason "budget spent (${left}s left, needs ${min}s)"
    printf '%-18s skipped (budget spent)\n' "$name"
    return 1
  fi
  STEP_LIMIT=$(( left < limit ? left : limit ))
  STEP_DEADLINE=$((SECONDS + STEP_LIMIT))
  STATUS[$name]=running
  steps record "$SUMMARY" --name "$name" --status running --reason "started, limit ${STEP_LIMIT}s"
}

# finish_step NAME LIMIT RC T0 LOG OFFSET [T1]: the exit code is the status (0 ok, 3 skipped, 124/137 timeout, else
# failed); $WORK/NAME.json, when the step wrote one, holds its numbers.
finish_step() {
  local name=$1 limit=$2 rc=$3 t0=$4 log=$5 offset=$6 t1=${7:-$EPOCHREALTIME} status seconds reason=()
  seconds=$(awk "BEGIN { print $t1 - $t0 }")
  case $rc in
    0) status=ok ;;
    3) status=skipped ;;
    124|137) status=timeout; reason=(--reason "stopped at its ${limit}s limit") ;;
    *) status=failed ;;
  esac
  STATUS[$name]=$status
  steps record "$SUMMARY" --name "$name" --status "$status" --seconds "$seconds" --detail "$WORK/$name.json" \
    --log "$log" --log-offset "$offset" "${reason[@]}"
  printf '%-18s %-8s %6.1fs\n' "$name" "$status" "$seconds"
}

# run_step NAME LIMIT_S MIN_S "PREREQ ..." FUNCTION: the function runs in this shell (its exports stay), its
# output appended to the log.
run_step() {
  local name=$1 fn=$5 offset t0
  may_run "$1" "$2" "$3" "$4" || return 0
  offset=$(stat -c %s "$LOG")
  printf '\n===== %s (limit %ss) =====\n' "$name" "$STEP_LIMIT" >> "$LOG"
  t0=$EPOCHREALTIME
  "$fn" >> "$LOG" 2>&1
  finish_step "$name" "$STEP_LIMIT" $? "$t0" "$LOG" "$offset"
}

# start_step ... / join_step NAME: the same in the background, for a correctness step that may overlap others
# (none of them is timed); its output goes to the log when it is joined, before anything is timed.
declare -A BG_PID BG_T0 BG_LIMIT
start_step() {
  local name=$1 fn=$5
  may_run "$1" "$2" "$3" "$4" || return 0
  BG_T0[$name]=$EPOCHREALTIME
  BG_LIMIT[$name]=$STEP_LIMIT
  { "$fn"; local rc=$?; echo "$EPOCHREALTIME" > "$WORK/$name.end"; exit $rc; } > "$WORK/$name.log" 2>&1 &
  BG_PID[$name]=$!
}
join_step() {
  local name=$1 rc offset
  [ -n "${BG_PID[$name]:-}" ] || return 0
  wait "${BG_PID[$name]}"
  rc=$?
  offset=$(stat -c %s "$LOG")
  printf '\n===== %s (limit %ss, in the background) =====\n' "$name" "${BG_LIMIT[$name]}" >> "$LOG"
  cat "$WORK/$name.log" >> "$LOG"
  finish_step "$name" "${BG_LIMIT[$name]}" "$rc" "${BG_T0[$name]}" "$LOG" "$offset" "$(cat "$WORK/$name.end")"
  unset "BG_PID[$name]"
}

# ------------------------------------------------------------------------------------------------------ steps
step_setup() {
  if [ "$mode" = cuda ] && ls "$REPO"/.gpu_check/wheels/*.whl >/dev/null 2>&1; then
    tmo "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
      "$REPO"/.gpu_check/wheels/*.whl || return 1
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! "$PY" -c "import ddpmlab" 2>/dev/null; then  # not installed: this checkout's src
    export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
  fi
  # Found, not imported (env imports torch): a missing package fails here, with its name.
  tmo "$PY" -c "
import importlib.util as u, sys
wanted = ('torch', 'lightning', 'hydra', 'omegaconf', 'torchmetrics', 'torchvision', 'diffusers', 'ddpmlab')
missing = [m for m in wanted if u.find_spec(m) is None]
print('ddpmlab from', u.find_spec('ddpmlab').origin if 'ddpmlab' not in missing else None, '; missing:', missing)
sys.exit(1 if missing else 0)"
}

step_env() {
  tmo "$PY" "$REPO/bench/gpu_check_steps.py" env --mode "$mode" --out "$WORK/env.json"
}

step_pytest_gpu() {
  local files rc
  files=$(grep -l "mark.gpu" "$REPO"/tests/test_*.py)
  if [ -z "$files" ]; then echo "no test file carries the gpu mark"; return 3; fi
  # shellcheck disable=SC2086
  tmo "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$WORK/pytest.xml" $files
  rc=$?
  [ "$rc" -eq 124 ] && return 124
  steps pytest --junit "$WORK/pytest.xml" --rc "$rc" --out "$WORK/pytest_gpu.json"
}

TRAIN_DIR=$WORK/train
step_train_cli() {
  local args levers max_steps
  if [ "$mode" = cuda ]; then
    max_steps=400
    levers=$(steps levers --config train --state on) || return 1
    args=(model=unet_small trainer=gpu_fast data.on_device=true data.batch_size=128 trainer.max_steps=$max_steps
          trainer.val_check_interval=200 trainer.limit_val_batches=4 trainer.log_every_n_steps=10
          callbacks.sample_grid.num_steps=50 $levers)
  else
    max_steps=20
    levers=""  # every lever is on "auto", off on a CPU: the plain eager path, as users get it there
    args=(model=unet_tiny trainer=gpu_fast data.on_device=true data.batch_size=32 trainer.max_steps=$max_steps
          schedule.num_timesteps=100 trainer.val_check_interval=10 trainer.limit_val_batches=1
          trainer.log_every_n_steps=2 callbacks.sample_grid.num_samples=16 callbacks.sample_grid.num_steps=10
          callbacks.denoising_chain.num_images=2 callbacks.forward_strip.num_images=2)
  fi
  if [ -n "$data_root" ]; then
    if ! ls "$data_root"/MNIST/raw/train-images-idx3-ubyte* >/dev/null 2>&1; then
      echo "no MNIST files in $data_root/MNIST/raw: run bench/prepare_device.sh --mnist-root DIR first" \
           "and carry .gpu_check (bench/README.md)"
      return 1
    fi
    args+=(data=mnist "data.root=$data_root")
  else
    args+=(data=digits)
  fi
  args+=(trainer.enable_progress_bar=false callbacks.checkpoint.every_n_train_steps=$max_steps
         callbacks.sample_grid.every_n_steps=$max_steps "hydra.run.dir=$TRAIN_DIR")
  echo "python train.py ${args[*]}"
  tmo "$PY" "$REPO/train.py" "${args[@]}" || return $?
  cp "$TRAIN_DIR/metrics.csv" "$OUT/metrics.csv"
  cp "$(ls "$TRAIN_DIR"/grids/*.png | tail -n 1)" "$OUT/train_grid.png"
  steps train-cli --run-dir "$TRAIN_DIR" --max-steps "$max_steps" --overrides "$levers" --out "$WORK/train_cli.json"
}

step_loss_curve() {
  steps loss-curve --metrics "$TRAIN_DIR/metrics.csv" --out "$WORK/loss_curve.json"
}

step_sample_cli() {
  local on off args fast_path=0
  if [ "$mode" = cuda ]; then
    on=$(steps levers --config sample --state on) || return 1
    args=(sampler=ddim sampler.num_steps=50 num_samples=256 batch_size=256)
  else
    on=""  # auto: off on a CPU
    args=(sampler=ddim sampler.num_steps=10 num_samples=16 batch_size=16)
  fi
  off=$(steps levers --config sample --state off) || return 1
  [ -n "$off" ] && fast_path=1
  args+=("ckpt_path=$TRAIN_DIR/checkpoints/last.ckpt" seed=0)
  echo "fast:  python sample.py ${args[*]} $on"
  # shellcheck disable=SC2086
  tmo "$PY" "$REPO/sample.py" "${args[@]}" $on "hydra.run.dir=$WORK/sample_fast" || return $?
  cp "$WORK/sample_fast/grid.png" "$OUT/sample_grid.png"
  echo "eager: python sample.py ${args[*]} $off"
  # shellcheck disable=SC2086
  tmo "$PY" "$REPO/sample.py" "${args[@]}" $off "hydra.run.dir=$WORK/sample_eager" || return $?
  steps compare --fast "$WORK/sample_fast" --eager "$WORK/sample_eager" --mode "$mode" --cli-fast-path "$fast_path" \
    --fast-overrides "$on" --eager-overrides "$off" --out "$WORK/sample_cli.json"
}

step_evaluate_bpd() {
  local n stride
  if [ "$mode" = cuda ]; then n=64 stride=10; else n=4 stride=10; fi
  tmo "$PY" "$REPO/evaluate.py" "ckpt_path=$TRAIN_DIR/checkpoints/last.ckpt" bpd.num_images=$n bpd.stride=$stride \
    batch_size=$n seed=0 "hydra.run.dir=$WORK/evaluate" || return $?
  steps bpd --metrics "$WORK/evaluate/metrics.json" --out "$WORK/evaluate_bpd.json"
}

TINY_NET=(--model unet_tiny --image-size 8 --channels 1 --peer-channels 32,32 --peer-groups 8 --cpu-threads 1)
step_train_throughput() {
  if [ "$mode" = cuda ]; then
    tmo "$PY" "$REPO/bench/train_throughput.py" --batch-size 128 --steps 30 --warmup 10 \
      --out "$WORK/train_throughput_result.json" || return $?
  else
    tmo "$PY" "$REPO/bench/train_throughput.py" "${TINY_NET[@]}" --batch-size 8 --steps 3 --warmup 1 \
      --out "$WORK/train_throughput_result.json" || return $?
  fi
  steps speed --result "$WORK/train_throughput_result.json" --out "$WORK/train_throughput.json"
}

step_sample_throughput() {
  if [ "$mode" = cuda ]; then
    tmo "$PY" "$REPO/bench/sample_throughput.py" --sampler ddim --num-steps 50 --batch-size 256 --runs 3 \
      --out "$WORK/sample_throughput_result.json" || return $?
  else
    tmo "$PY" "$REPO/bench/sample_throughput.py" "${TINY_NET[@]}" --sampler ddim --num-steps 3 --batch-size 4 \
      --runs 1 --out "$WORK/sample_throughput_result.json" || return $?
  fi
  steps speed --result "$WORK/sample_throughput_result.json" --out "$WORK/sample_throughput.json"
}

# ------------------------------------------------------------------------------------------------------- run
if ! steps init "$SUMMARY" --mode "$mode" --repo "$REPO" --budget "$budget" --command "bench/gpu_check.sh $*"; then
  echo "gpu_check.sh: $PY could not run bench/gpu_check_steps.py" >&2
  exit 2
fi
echo "gpu_check ($mode): writing to $OUT, budget ${budget}s"
#          name               limit  min  needs          function
run_step   setup                120   20  ""             step_setup
run_step   env                   60   10  "setup"        step_env
start_step pytest_gpu           200   30  "setup env"    step_pytest_gpu        # in the background
run_step   train_cli            160   60  "setup env"    step_train_cli
run_step   loss_curve            20    5  "train_cli"    step_loss_curve
start_step evaluate_bpd          60   20  "train_cli"    step_evaluate_bpd      # in the background
run_step   sample_cli           130   40  "train_cli"    step_sample_cli
join_step  pytest_gpu
join_step  evaluate_bpd
run_step   train_throughput     240   60  "setup env"    step_train_throughput
run_step   sample_throughput    150   40  "setup env"    step_sample_throughput
steps finish "$SUMMARY" --elapsed $((SECONDS - START))
rc=$?  # 1 when a step failed or timed out
echo "summary: $SUMMARY"
rm -rf "$WORK"
exit $rc
