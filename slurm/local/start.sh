#!/usr/bin/env bash
# Starts a throw-away SLURM cluster on this machine (munge, MariaDB, slurmdbd, slurmctld, slurmd) for trying
# slurm/train.sh and `drseg sweep` on a workstation, and for the tests. Needs root; installs the Debian packages.
# Usage: slurm/local/start.sh [STATE_DIR]   (default /tmp/hpc_drseg-slurm; stop with slurm/local/stop.sh STATE_DIR)
# Environment: DRSEG_FAKE_GPUS=N (fake gres/gpu devices per node; 0, the default, is a cluster without GPUs),
# DRSEG_SLURM_NODES=1|2 (2 = two slurmd, one host), DRSEG_NODE_CPUS=N (CPUs each node offers; default nproc).
# Prints `export SLURM_CONF=…` (also written to STATE_DIR/env.sh). Exit status 77: SLURM can't be started here.
set -euo pipefail

state="$(realpath -m "${1:-${DRSEG_SLURM_DIR:-/tmp/hpc_drseg-slurm}}")"
fake_gpus="${DRSEG_FAKE_GPUS:-0}"
num_nodes="${DRSEG_SLURM_NODES:-1}"
node_cpus="${DRSEG_NODE_CPUS:-$(nproc)}"
packages=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
commands=(munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct sacctmgr)
# Held while installing and picking ports, so two clusters started at once don't take the same ports.
global_lock=/tmp/hpc_drseg-slurm.lock
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

say() { echo "[slurm-local] $*" >&2; }
die() { say "error: $*"; exit 1; }
cannot() { say "cannot start SLURM here: $*"; exit 77; }  # 77: the tests skip instead of failing

check_arguments() {
  [ "$(id -u)" -eq 0 ] || cannot "needs root (daemons run as root with SlurmUser=root); run: sudo $0 $state"
  [[ "$fake_gpus" =~ ^[0-9]+$ ]] || die "DRSEG_FAKE_GPUS=$fake_gpus; give a whole number of fake GPUs per node"
  [[ "$num_nodes" =~ ^[12]$ ]] || die "DRSEG_SLURM_NODES=$num_nodes; give 1 or 2"
  [[ "$node_cpus" =~ ^[1-9][0-9]*$ ]] || die "DRSEG_NODE_CPUS=$node_cpus; give a whole number of CPUs per node (>= 1)"
}

install_packages() {
  local missing=() cmd
  for cmd in "${commands[@]}"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  command -v apt-get >/dev/null || cannot "missing ${missing[*]} and no apt-get; install: ${packages[*]}"
  say "installing ${packages[*]} (missing: ${missing[*]})"
  # A policy-rc.d that exits 101 keeps the packages' scripts from starting system-wide daemons we don't own.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  local apt=(apt-get -q -o DPkg::Lock::Timeout=300) status=0
  { DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >&2 \
      && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${packages[@]}" >&2; } \
    || status=$?
  [ "$own_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$status" -eq 0 ] || cannot "apt-get install ${packages[*]} failed (status $status); no network?"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The layout asked for; a running cluster with another layout is restarted.
settings() { echo "nodes=$num_nodes fake_gpus=$fake_gpus cpus=$node_cpus"; }

all_running() {
  [ -s "$state/etc/slurm.conf" ] && [ "$(cat "$state/etc/settings" 2>/dev/null)" = "$(settings)" ] || return 1
  local pidfile
  for pidfile in "$state"/run/{munged,mariadbd,slurmdbd,slurmctld}.pid $(node_pidfiles); do
    pid_alive "$pidfile" || return 1
  done
}

node_names() { if [ "$num_nodes" -eq 2 ]; then echo "drseg1 drseg2"; else hostname -s; fi; }
node_pidfiles() { local n; for n in $(node_names); do echo "$state/run/slurmd-$n.pid"; done; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# One block of consecutive ports: slurmctld, slurmdbd, MariaDB, slurmd(s). 6817 (SLURM's default) when free.
pick_ports() {
  local base offset
  for base in $(seq 6817 10 7807); do
    for offset in 0 1 2 3 4; do port_free $((base + offset)) || continue 2; done
    ctld_port=$base dbd_port=$((base + 1)) db_port=$((base + 2)) slurmd_port=$((base + 3))
    return 0
  done
  die "no free block of 5 TCP ports in 6817-7811"
}

make_dirs() {
  mkdir -p "$state"/{etc,run,log,munge,mysql,ctld,spool,dev}
  chmod 755 "$state" "$state/munge"  # clients of munged must reach its socket
}

wait_for() {  # wait_for WHAT SECONDS LOG COMMAND…: polls COMMAND until it succeeds
  local what=$1 timeout=$2 end=$((SECONDS + $2)) log=$3
  shift 3
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$end" ]; then
      tail -n 20 "$log" >&2 2>/dev/null || true
      die "$what not up after ${timeout} s; log: $log"
    fi
    sleep 0.2
  done
}

start_munge() {
  local key="$state/munge/munge.key"
  if [ ! -s "$key" ]; then
    head -c 1024 /dev/urandom >"$key"
    chmod 400 "$key"
  fi
  # --force: as root, accept a state folder below a private one (pytest's tmp) that other users can't traverse.
  munged --force --socket="$state/munge/munge.socket" --key-file="$key" --pid-file="$state/run/munged.pid" \
    --log-file="$state/log/munged.log" --seed-file="$state/munge/munge.seed" --num-threads=2 8>&-
  wait_for munged 20 "$state/log/munged.log" munge --socket="$state/munge/munge.socket" -n
}

mysql() { mariadb --no-defaults --socket="$state/run/mysqld.sock" -uroot "$@"; }

start_mariadb() {
  local datadir="$state/mysql"
  if [ ! -d "$datadir/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$datadir" --user=root --auth-root-authentication-method=socket \
      --skip-test-db >"$state/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $state/log/"
  fi
  # Small buffers and lazy flushing: a few hundred job records, thrown away afterwards.
  setsid mariadbd --no-defaults --user=root --datadir="$datadir" --socket="$state/run/mysqld.sock" \
    --port="$db_port" --bind-address=127.0.0.1 --pid-file="$state/run/mariadbd.pid" \
    --log-error="$state/log/mariadbd.log" --skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=64M \
    --innodb-log-file-size=16M --innodb-flush-log-at-trx-commit=0 --innodb-lock-wait-timeout=900 \
    </dev/null >/dev/null 2>&1 8>&- &
  wait_for mariadbd 60 "$state/log/mariadbd.log" mysql -e "SELECT 1"
  mysql <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

write_slurmdbd_conf() {
  umask 077  # slurmdbd refuses a world-readable file holding the database password
  cat >"$state/etc/slurmdbd.conf" <<EOC
AuthType=auth/munge
AuthInfo=socket=$state/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$state/run/slurmdbd.pid
LogFile=$state/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOC
  umask 022
}

# RealMemory slightly below what slurmd measures: a node reporting less memory than configured is drained.
real_memory_mb() { slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | awk '{print int($1 * 0.95)}'; }

node_lines() {
  local gres="" mem cpus="$node_cpus" index=0 name
  mem="$(real_memory_mb)"
  [ "$fake_gpus" -gt 0 ] && gres="Gres=gpu:$fake_gpus"
  for name in $(node_names); do
    echo "NodeName=$name NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((slurmd_port + index))" \
      "CPUs=$cpus RealMemory=$mem $gres State=UNKNOWN"
    index=$((index + 1))
  done
}

write_gres_conf() {
  : >"$state/etc/gres.conf"
  [ "$fake_gpus" -gt 0 ] || return 0
  local name i
  for name in $(node_names); do
    for i in $(seq 0 $((fake_gpus - 1))); do
      # Fake devices for gres' File= (a char device like /dev/null): SLURM only counts and hands them out.
      [ -e "$state/dev/$name-gpu$i" ] || mknod "$state/dev/$name-gpu$i" c 1 3
      echo "NodeName=$name Name=gpu File=$state/dev/$name-gpu$i" >>"$state/etc/gres.conf"
    done
  done
}

write_slurm_conf() {
  local gres_types="" host
  host="$(hostname -s)"
  [ "$fake_gpus" -gt 0 ] && gres_types="GresTypes=gpu"
  # A node offering more CPUs than it has (DRSEG_NODE_CPUS > nproc, e.g. to schedule train.sh's default 8 CPUs on a
  # small machine) would be marked INVALID when slurmd registers; config_overrides trusts slurm.conf instead.
  local overrides=""
  [ "$node_cpus" -gt "$(nproc)" ] && overrides="SlurmdParameters=config_overrides"
  cat >"$state/etc/slurm.conf" <<EOC
# Generated by slurm/local/start.sh: a throw-away cluster on $host; everything lives under $state.
ClusterName=drseg
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (default 120 s); a local cluster needs no such margin.
AuthInfo=socket=$state/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
# No systemd/cgroups here: track job processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Scheduling passes every second (defaults 60/30 s): a requeued job restarts as soon as its begin time comes.
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# The slurmdbd connection ignores AuthInfo: the munge socket has to be given here as well.
AccountingStoragePass=$state/munge/munge.socket
JobCompType=jobcomp/none
$gres_types
$overrides
$(node_lines)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOC
}

start_slurm() {
  export SLURM_CONF="$state/etc/slurm.conf"
  slurmdbd 8>&-
  wait_for slurmdbd 30 "$state/log/slurmdbd.log" sacctmgr -n show cluster
  # Registered before slurmctld starts, so its first jobs are accounted (submitit polls sacct).
  sacctmgr -i -Q add cluster drseg >/dev/null 2>&1 || true
  slurmctld 8>&-
  wait_for slurmctld 30 "$state/log/slurmctld.log" scontrol ping
  local name
  for name in $(node_names); do
    if [ "$num_nodes" -eq 2 ]; then slurmd -N "$name" 8>&-; else slurmd 8>&-; fi
  done
  wait_for "idle node(s)" 60 "$state/log/slurmctld.log" nodes_idle
}

nodes_idle() {
  local states
  states="$(sinfo -h -N -o %T)" || return 1
  [ "$(grep -c '^idle$' <<<"$states")" -eq "$num_nodes" ]
}

start_all() {
  db_pass="$(sed -n 's/^StoragePass=//p' "$state/etc/slurmdbd.conf" 2>/dev/null || true)"
  [ -n "$db_pass" ] || db_pass="$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
  start_munge
  start_mariadb
  write_slurmdbd_conf
  write_gres_conf
  write_slurm_conf
  settings >"$state/etc/settings"
  start_slurm
}

# On any failure after the first daemon started: stop them all again, so nothing is left running.
on_exit() {
  local status=$?
  if [ "$status" -ne 0 ] && [ "${starting:-0}" -eq 1 ]; then
    say "start failed; stopping what was started"
    "$here/stop.sh" "$state" >&2 || true
  fi
}

main() {
  check_arguments
  trap on_exit EXIT
  mkdir -p "$(dirname "$state")"
  # fd 8 holds the lock; daemons are started with it closed, or a killed start.sh would leave it held by them.
  exec 8>"$global_lock"
  flock -w 900 8 || die "another slurm/local/start.sh has held $global_lock for 15 min"
  install_packages
  if all_running; then
    say "already running in $state"
  else
    "$here/stop.sh" "$state" >&2  # leftovers of a half-started cluster
    local t0=$SECONDS
    make_dirs
    pick_ports
    starting=1
    start_all
    starting=0
    say "cluster up in $((SECONDS - t0)) s (ports $ctld_port-$((slurmd_port + num_nodes - 1)), state $state)"
  fi
  flock -u 8
  echo "export SLURM_CONF=$state/etc/slurm.conf" | tee "$state/env.sh"
}

main
