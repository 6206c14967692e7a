#!/usr/bin/env bash
# Trains, then evaluates, one hpc_drseg run as a SLURM batch job; checkpoints and requeues itself before its time
# limit or on preemption, and the requeued job resumes. Usage, from the repository (its logs/ folder is committed:
# SLURM opens the --output file before this script runs) or from any folder that has a logs/ folder:
#   sbatch [--nodes=N] [--gpus-per-node=G] [--array=0-4] slurm/train.sh [CONFIG] [key=value …]
#   slurm/train.sh [SBATCH_OPTION …] [CONFIG] [key=value …]   (submits itself; creates logs/; drops the GPU request
#                                                               on a partition without GPUs)
# On a cluster without GPUs, sbatch needs --gpus-per-node=0. Exit status 2: the configuration or an override is
# invalid (one line names the key). Environment: DRSEG_VENV, DRSEG_CPU_PROCS, DRSEG_ACCELERATE_CONFIG,
# DRSEG_GPUS_PER_NODE, DRSEG_DRY_RUN, DRSEG_MAX_REQUEUES (see docs/cluster.md). A stopped job is requeued only while
# SLURM still shows it RUNNING (never after a plain scancel), at most DRSEG_MAX_REQUEUES times, and only if its
# checkpoint advanced since it started; otherwise it ends FAILED (status 75) with the reason in its log.
#SBATCH --job-name=drseg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR2@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# From the first line on, a stop signal is remembered rather than fatal (bash's default for USR2 and TERM is to
# die): with a --time no longer than the --signal lead time SLURM signals the job as it starts. main() acts on it.
early_signal=""
trap 'early_signal=USR2' USR2
trap 'early_signal=TERM' TERM

EXIT_RESUMABLE=75  # hpc_drseg.train.signals: "checkpoint written, run me again"
DEFAULT_MAX_REQUEUES=5
DEFAULT_CONFIG=configs/attention_deeplab.yaml

say() { echo "[train.sh $(date '+%F %T')] $*" >&2; }

activate_venv() {
  local venv="${DRSEG_VENV:-$PWD/.venv}"
  if [ -f "$venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
  fi
  export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
}

# [CONFIG] [key=value …] → $config, $overrides: the first argument is the config unless it is an override.
split_arguments() {
  config="$DEFAULT_CONFIG"
  if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then
    config="$1"
    shift
  fi
  overrides=("$@")
}

# drseg's own check prints a bad key, value or file as one line and exits 2; the Python that resolves the run
# directory below would print a traceback for the same mistake.
check_config() {
  local status=0
  python -m hpc_drseg config check --config "$config" "${overrides[@]}" >/dev/null || status=$?
  return "$status"
}

# ------------------------------------------------------------------------------------ outside a job: submit
# sbatch's short options that take a value (-c 8, -N 2, -t 1:00:00); long ones need --name=value here.
SHORT_WITH_VALUE='^-[AabcDdeGiJLMmNnopqStwx]$'

# The user chose GPUs (or none) on the command line or through sbatch's environment variables.
gpus_chosen() {
  local option
  [ -n "${SBATCH_GPUS:-}${SBATCH_GPUS_PER_NODE:-}${SBATCH_GPUS_PER_TASK:-}${SBATCH_GRES:-}" ] && return 0
  for option in "${sbatch_options[@]}"; do
    case "$option" in
      --gpus* | --gres* | -G*) return 0 ;;
    esac
  done
  return 1
}

# The partition the job would go to: -p/--partition, else $SBATCH_PARTITION, else the default one ("name*" in sinfo).
target_partition() {
  local i option partition="${SBATCH_PARTITION:-}"
  for ((i = 0; i < ${#sbatch_options[@]}; i++)); do
    option="${sbatch_options[$i]}"
    case "$option" in
      -p) partition="${sbatch_options[$((i + 1))]:-}" ;;
      -p*) partition="${option#-p}" ;;
      --partition=*) partition="${option#--partition=}" ;;
    esac
  done
  [ -n "$partition" ] || partition="$(sinfo -h -o %P 2>/dev/null | sed -n 's/\*$//p' | head -n 1)"
  echo "$partition"
}

# sbatch rejects the #SBATCH GPU request outright where no node of the partition has a gpu GRES ("Invalid generic
# resource (gres) specification"). sinfo's %G is e.g. "gpu:4", "gpu:a100:4(S:0-1),shard:8" or "(null)". Unknown
# (sinfo fails, no partition found) counts as "has GPUs": sbatch then decides, as it would without this script.
partition_has_gpus() {
  local gres
  [ -n "$1" ] || return 0
  gres="$(sinfo -h -p "$1" -o %G 2>/dev/null)" || return 0
  [ -n "$gres" ] || return 0
  grep -Eq '(^|,)gpu([:(,]|$)' <<<"$gres"
}

submit() {
  sbatch_options=()
  while [ $# -gt 0 ] && [[ "$1" == -* ]]; do
    sbatch_options+=("$1")
    if [[ "$1" =~ $SHORT_WITH_VALUE ]] && [ $# -gt 1 ]; then
      sbatch_options+=("$2")
      shift
    fi
    shift
  done
  split_arguments "$@"
  # A mistake in the config is reported now rather than after the job has waited in the queue; in a subshell, so
  # the environment sbatch passes to the job stays the caller's. Skipped where the package isn't installed here.
  local status=0
  (activate_venv && python -c 'import hpc_drseg' 2>/dev/null || exit 0; check_config) || status=$?
  if [ "$status" -ne 0 ]; then
    say "configuration check failed (status $status): nothing submitted"
    exit "$status"
  fi
  if ! gpus_chosen; then
    local partition
    partition="$(target_partition)"
    if ! partition_has_gpus "$partition"; then
      say "partition $partition has no GPUs (no gpu GRES in sinfo): submitting with --gpus-per-node=0"
      sbatch_options+=(--gpus-per-node=0)
    fi
  fi
  mkdir -p logs  # the --output folder, for a submit folder other than the repository
  exec sbatch "${sbatch_options[@]}" "${BASH_SOURCE[0]}" "$@"
}

[ -n "${SLURM_JOB_ID:-}" ] || submit "$@"

# ------------------------------------------------------------------------------------------------ in the job
cd "${SLURM_SUBMIT_DIR:-.}"
activate_venv
split_arguments "$@"

has_override() { local arg; for arg in "${overrides[@]}"; do [[ "$arg" == "$1="* ]] && return 0; done; return 1; }

# Run directory as the trainer will resolve it (train.run_dir, else runs/<config stem>).
resolve_run_dir() {
  python - "$config" "${overrides[@]}" <<'PY'
import sys

from hpc_drseg.config import load_config

print(load_config(sys.argv[1], sys.argv[2:]).run_dir)
PY
}

# Array jobs train one seed per task, each in its own run directory, unless the user chose them.
add_array_overrides() {
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || return 0
  local task="$SLURM_ARRAY_TASK_ID"
  if has_override train.run_dir; then
    say "warning: train.run_dir given in an array job: all tasks share it"
  else
    overrides+=("train.run_dir=$(resolve_run_dir)-seed$task")
  fi
  has_override train.seed || overrides+=("train.seed=$task")
}

# Processes per node: one per allocated GPU; without GPUs DRSEG_CPU_PROCS (default 1) CPU processes on gloo.
procs_per_node() {
  local gpus="${DRSEG_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
  if [ "$gpus" -gt 0 ]; then echo "$gpus"; else echo "${DRSEG_CPU_PROCS:-1}"; fi
}

# Each job gets its own rendezvous port, so two jobs sharing a node don't collide.
main_port() { echo $((20000 + SLURM_JOB_ID % 20000)); }

# The first node's address as SLURM knows it (NodeAddr; equals the host name on most clusters).
main_address() {
  local first
  first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1
}

# DRSEG_DRY_RUN=1: every task prints the command it would run (with its own machine rank) instead of running it.
build_command() {
  local nodes="${SLURM_JOB_NUM_NODES:-1}" per_node train=(-m hpc_drseg train --config "$config" "${overrides[@]}")
  local launch=(launch) exec_word=exec
  [ "${DRSEG_DRY_RUN:-0}" = 1 ] && exec_word="exec echo"
  per_node="$(procs_per_node)"
  # Each process's math threads share the task's CPUs (torch would use every core of the node otherwise).
  local cpus="${SLURM_CPUS_PER_TASK:-1}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((cpus / per_node > 0 ? cpus / per_node : 1))}"
  if [ -n "${DRSEG_ACCELERATE_CONFIG:-}" ]; then
    launch+=(--config_file "$DRSEG_ACCELERATE_CONFIG")
  else  # precision is our config's train.precision; these only silence accelerate's "defaults used" notice
    launch+=(--mixed_precision no --dynamo_backend no)
  fi
  if [ "$nodes" -gt 1 ]; then
    export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"  # srun no longer inherits --cpus-per-task (Slurm >= 22.05)
    local quoted
    quoted="$(printf ' %q' accelerate "${launch[@]}" --multi_gpu --num_machines "$nodes" \
      --num_processes $((nodes * per_node)) --main_process_ip "$(main_address)" --main_process_port "$(main_port)")"
    # $SLURM_NODEID stays quoted: each node's task expands its own rank, not the batch shell once for all.
    # --unbuffered: progress bars (lines ending in \r) reach the log as they are drawn, not at the epoch's end.
    command=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 --unbuffered bash -c
      "$exec_word$quoted --machine_rank \"\$SLURM_NODEID\"$(printf ' %q' "${train[@]}")")
  elif [ "$per_node" -gt 1 ]; then
    command=(accelerate "${launch[@]}" --multi_gpu --num_machines 1 --num_processes "$per_node"
      --main_process_port "$(main_port)" "${train[@]}")
  else
    command=(python "${train[@]}")
  fi
  if [ "${DRSEG_DRY_RUN:-0}" = 1 ] && [ "$nodes" -le 1 ]; then command=(echo "${command[@]}"); fi
}

# squeue's state of this job (RUNNING, COMPLETING, …); empty when squeue no longer lists it or cannot be asked.
job_state() { squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null | head -n 1 || true; }

# bash runs a trap only after a foreground child exits: the launcher runs in the background and is waited for.
# USR2 (time limit, --signal=B:USR2@90) and TERM (scancel, preemption) reach the training processes as TERM: the
# trainer checkpoints on either, and torchrun/accelerate pass TERM on to their workers but die on a USR2.
# After a plain scancel (or the time limit, or a preemption that SLURM requeues itself) the job is no longer RUNNING
# when its TERM arrives; that is noted at once, because SLURM kills the script KillWait seconds later.
on_stop_signal() {
  stop_signal="$1"
  if [ -n "$child" ]; then
    if [ "${command[0]}" = srun ]; then
      signal_steps
    else
      kill -TERM "$child" 2>/dev/null || true
    fi
  fi
  if [ "$1" = TERM ] && [ -z "$ended_state" ]; then
    local state
    state="$(job_state)"
    if [ "$state" != RUNNING ]; then
      ended_state="${state:-gone from squeue}"
      say "SIGTERM while job $SLURM_JOB_ID is $ended_state (cancelled, timed out or preempted): it will not be requeued"
    fi
  fi
}

# srun answers TERM by killing its tasks at once. SLURM itself delivers a step signal to every process of the step
# (launchers and workers) on every node, as a preemption does.
signal_steps() {
  local step
  for step in $(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null); do
    if [[ "$step" =~ \.[0-9]+$ ]]; then scancel --signal=TERM "$step" 2>/dev/null || true; fi
  done
}

# The global step saved in RUN/checkpoints/last.pt: 0 without one, -1 if it can't be read (the trainer then says why).
checkpoint_step() {
  local path="$run_dir/checkpoints/last.pt"
  [ -f "$path" ] || { echo 0; return 0; }
  python -c 'import sys, torch
print(int(torch.load(sys.argv[1], map_location="cpu", weights_only=True)["progress"]["global_step"]))' "$path" \
    2>/dev/null || echo -1
}

# The job's time limit in seconds (squeue's %l: M:SS, H:MM:SS or D-HH:MM:SS); fails for UNLIMITED or unknown.
time_limit_s() {
  local limit
  limit="$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null | head -n 1)" || return 1
  [[ "$limit" =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 1
  echo $(((((10#${BASH_REMATCH[2]:-0} * 24) + 10#${BASH_REMATCH[4]:-0}) * 60 + 10#${BASH_REMATCH[5]}) * 60 \
    + 10#${BASH_REMATCH[6]}))
}

# How long before the time limit SLURM signals the job: the --signal of the sbatch command line (sacct's
# SubmitLine), else $SBATCH_SIGNAL, else this script's #SBATCH line; sbatch's default is 60 s when @ is omitted.
# slurmdbd may record a just-started job a moment late: a few tries; none without accounting (sacct fails).
signal_lead_s() {
  local line="" spec try
  for try in 1 2 3 4 5; do
    line="$(sacct -X -n -P -j "$SLURM_JOB_ID" -o SubmitLine 2>/dev/null)" || break
    [ -z "$line" ] || break
    [ "$try" = 5 ] || sleep 1
  done
  spec="$(grep -oE -- '--signal[= ][^ ]+' <<<"$line" | tail -n 1 || true)"
  spec="${spec#--signal?}"
  [ -n "$spec" ] || spec="${SBATCH_SIGNAL:-}"
  [ -n "$spec" ] || spec="$(sed -n 's/^#SBATCH --signal=//p' "$0" | tail -n 1)"
  if [[ "$spec" =~ @([0-9]+)$ ]]; then echo "${BASH_REMATCH[1]}"; else echo 60; fi
}

# A limit no longer than the lead time has SLURM signal the job as it starts: it stops before its first step.
warn_short_time_limit() {
  local limit lead
  limit="$(time_limit_s)" || return 0
  lead="$(signal_lead_s)"
  if [ "$limit" -le "$lead" ]; then
    say "warning: the time limit (${limit} s) is not longer than the --signal lead time (${lead} s): SLURM signals" \
      "the job before it trains, and a job stopped without progress is not requeued"
  fi
}

run_launcher() {
  "${command[@]}" &
  child=$!
  local status
  while :; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break  # still alive: wait was cut short by a trapped signal
  done
  child=""
  return "$status"
}

# A stopped job goes back to the queue only while it is still RUNNING (a plain scancel leaves it COMPLETING or gone:
# a cancel stays a cancel), has been requeued fewer than DRSEG_MAX_REQUEUES times, and its last.pt advanced since this
# run started (a job stopped before it trains would be stopped again, in a loop). Otherwise it ends with status 75:
# last.pt, if any, is intact, and resubmitting the same command resumes from it.
requeue() {
  local why="$1" restarts="${SLURM_RESTART_COUNT:-0}" step="$start_step"
  if [ -z "$ended_state" ]; then
    local state
    state="$(job_state)"
    [ "$state" = RUNNING ] || ended_state="${state:-gone from squeue}"
  fi
  if [ -n "$ended_state" ]; then
    say "$why; job $SLURM_JOB_ID is $ended_state, not RUNNING: not requeued"
    exit "$EXIT_RESUMABLE"
  fi
  if [ "$restarts" -ge "$max_requeues" ]; then
    say "$why; not requeued: job $SLURM_JOB_ID was already requeued $restarts times (DRSEG_MAX_REQUEUES=$max_requeues);" \
      "resubmit the same command to resume from $run_dir/checkpoints/last.pt"
    exit "$EXIT_RESUMABLE"
  fi
  [ "$launched" = 0 ] || step="$(checkpoint_step)"
  if [ "$step" -le "$start_step" ]; then
    say "$why; not requeued: no progress since this run started ($run_dir/checkpoints/last.pt at global step" \
      "$step, as at the start; a requeued job would stop again before training: is --time longer than the --signal" \
      "lead time?)"
    exit "$EXIT_RESUMABLE"
  fi
  say "$why; requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $max_requeues; global step" \
    "$start_step -> $step; it resumes from the run's checkpoints/last.pt)"
  scontrol requeue "$SLURM_JOB_ID" || { say "scontrol requeue failed; resubmit by hand to resume"; exit 1; }
  exit 0
}

main() {
  stop_signal="$early_signal" child="" ended_state="" launched=0 start_step=0
  trap 'on_stop_signal USR2' USR2
  trap 'on_stop_signal TERM' TERM
  local status=0
  max_requeues="${DRSEG_MAX_REQUEUES:-$DEFAULT_MAX_REQUEUES}"
  if ! [[ "$max_requeues" =~ ^[0-9]+$ ]]; then
    say "DRSEG_MAX_REQUEUES must be a whole number >= 0, not '$max_requeues': job $SLURM_JOB_ID ends without training"
    exit 2
  fi
  check_config || status=$?
  if [ "$status" -ne 0 ]; then
    say "configuration check failed (status $status): job $SLURM_JOB_ID ends without training"
    exit "$status"
  fi
  add_array_overrides
  run_dir="$(resolve_run_dir)"
  build_command
  say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: run $run_dir"
  warn_short_time_limit
  start_step="$(checkpoint_step)"
  [ -z "$stop_signal" ] || requeue "stopped by $stop_signal before training started"
  say "launch: ${command[*]}"
  launched=1
  run_launcher || status=$?
  # Multi-process launchers report a worker's 75 as their own failure: after a stop signal any failure of the
  # launcher means "stopped", and the trainer resumes from RUN/checkpoints/last.pt.
  if [ "$status" -eq "$EXIT_RESUMABLE" ] || { [ -n "$stop_signal" ] && [ "$status" -ne 0 ]; }; then
    requeue "training stopped by ${stop_signal:-a signal} (status $status)"
  fi
  if [ "$status" -ne 0 ]; then
    say "training failed with status $status"
    exit "$status"
  fi
  [ "${DRSEG_DRY_RUN:-0}" = 1 ] && exit 0
  say "training done; evaluating $run_dir"
  python -m hpc_drseg eval --run "$run_dir"
}

main
