#!/usr/bin/env bash
# Stops the local SLURM cluster that slurm/local/start.sh started in STATE_DIR: cancels its jobs, then stops slurmd,
# slurmctld, slurmdbd, MariaDB and munged by their PID files (never by name). Safe to run twice or on a bare folder.
# Usage: slurm/local/stop.sh [STATE_DIR]   (default /tmp/hpc_drseg-slurm); add --purge to delete STATE_DIR too.
set -uo pipefail

purge=0
args=()
for arg in "$@"; do
  if [ "$arg" = --purge ]; then purge=1; else args+=("$arg"); fi
done
state="$(realpath -m "${args[0]:-${DRSEG_SLURM_DIR:-/tmp/hpc_drseg-slurm}}")"

say() { echo "[slurm-local] $*" >&2; }

# stop_group PIDFILE:NAME…: TERM to each, then wait (KILL after 20 s). The process's name must match, so a PID file
# left from an earlier boot whose number was reused by another program never gets that program killed.
stop_group() {
  local item pidfile name pid pids=() names=()
  for item in "$@"; do
    pidfile="${item%%:*}" name="${item##*:}"
    [ -s "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] && kill -TERM "$pid" 2>/dev/null; then
      pids+=("$pid") names+=("$name")
    fi
    rm -f "$pidfile"
  done
  local i deadline=$((SECONDS + 20)) killed
  for i in "${!pids[@]}"; do
    killed=0
    while kill -0 "${pids[$i]}" 2>/dev/null; do
      if [ "$SECONDS" -ge "$deadline" ] && [ "$killed" -eq 0 ]; then
        say "${names[$i]} (${pids[$i]}) ignored SIGTERM for 20 s; sending SIGKILL"
        kill -KILL "${pids[$i]}" 2>/dev/null
        killed=1
      fi
      sleep 0.1
    done
    say "stopped ${names[$i]} (${pids[$i]})"
  done
}

# Jobs first: their slurmstepd processes outlive slurmd otherwise.
cancel_jobs() {
  local pid
  pid="$(cat "$state/run/slurmctld.pid" 2>/dev/null)" || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  export SLURM_CONF="$state/etc/slurm.conf"
  local jobs
  jobs="$(timeout 10 squeue -h -o %A 2>/dev/null)" || return 0
  [ -n "$jobs" ] || return 0
  # shellcheck disable=SC2086
  timeout 10 scancel $jobs 2>/dev/null
  local waited=0
  while [ -n "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && [ "$waited" -lt 100 ]; do
    sleep 0.2
    waited=$((waited + 1))
  done
}

# Job processes outlive their daemons: a job step's slurmstepd and everything under it keep running after slurmd
# stops (e.g. a job requeued while the cluster went down). They carry this cluster's SLURM_CONF in their
# environment, which no other process on the machine does unless it was started for this cluster.
kill_job_processes() {
  local marker="SLURM_CONF=$state/etc/slurm.conf" proc pid env killed=0
  for proc in /proc/[0-9]*; do
    pid="${proc#/proc/}"
    [ "$pid" = "$$" ] && continue
    env="$( { tr '\0' '\n' <"$proc/environ"; } 2>/dev/null)" || continue
    grep -qxF "$marker" <<<"$env" || continue
    # slurmstepd itself, or a process of a job (SLURM_JOB_ID); never a client that only points at the cluster
    if [ "$(cat "$proc/comm" 2>/dev/null)" = slurmstepd ] || grep -q '^SLURM_JOB_ID=' <<<"$env"; then
      kill -KILL "$pid" 2>/dev/null && killed=$((killed + 1))
    fi
  done
  [ "$killed" -eq 0 ] || say "killed $killed leftover job process(es) of this cluster"
}

main() {
  [ -d "$state" ] || { say "nothing to stop: $state does not exist"; return 0; }
  cancel_jobs
  local slurmds=() pidfile
  for pidfile in "$state"/run/slurmd-*.pid; do
    [ -e "$pidfile" ] && slurmds+=("$pidfile:slurmd")
  done
  # Each daemon takes 2-4 s to exit, so they are stopped together: first SLURM's (slurmctld keeps accounting records
  # that slurmdbd misses in its state folder), then the services those use.
  stop_group "${slurmds[@]}" "$state/run/slurmctld.pid:slurmctld" "$state/run/slurmdbd.pid:slurmdbd"
  kill_job_processes
  stop_group "$state/run/mariadbd.pid:mariadbd" "$state/run/munged.pid:munged"
  if [ "$purge" -eq 1 ]; then
    rm -rf "$state"
    say "removed $state"
  fi
}

main
