#!/usr/bin/env bash
# Bring up a real SLURM cluster on this machine (munge, MariaDB, slurmdbd, slurmctld, and one
# slurmd per node: 2 nodes by default, SETOK_SLURM_DEV_NODES=N) from Debian packages.
# Idempotent: running daemons are left alone.
# State lives in $SETOK_SLURM_DEV_DIR (default /var/lib/setok-slurm-dev), never in the repo.
# Needs root. Stop with down.sh. See README.md beside this file.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ "$(id -u)" != 0 ]; then
  log "must run as root (daemons, /run/munge, package install)"
  exit 1
fi

# --- packages -------------------------------------------------------------------------
PKG_LIST="$HERE/../../.ci/apt/slurm.txt"
if [ -f "$PKG_LIST" ]; then
  pkgs=$(grep -v '^#' "$PKG_LIST" | xargs)
else
  pkgs="munge slurmctld slurmd slurm-client slurmdbd mariadb-server mariadb-client"
fi
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  log "installing:$missing"
  # Keep the packages' own init scripts from starting daemons (no systemd here).
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  apt-get update -qq || true
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# --- directories and config -----------------------------------------------------------
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/spool/ctld" "$STATE/munge" "$STATE/mysql-run"
for ((node = 0; node < NODE_COUNT; node++)); do mkdir -p "$STATE/spool/d-$(node_name "$node")"; done
chmod 755 "$STATE"
chown munge:munge "$STATE/munge" && chmod 700 "$STATE/munge"
mkdir -p "$LOG/munge" && chown munge:munge "$LOG/munge" && chmod 700 "$LOG/munge"
chown mysql:mysql "$STATE/mysql-run"

NODE_LINE="$(slurmd -C | head -n1)"
real_cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")"
real_mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")"
SLURMD_PARAMS=""
if [ -n "${SETOK_SLURM_DEV_CPUS:-}" ]; then
  # Declare more CPUs than the machine has (oversubscribe a tiny dev box on purpose).
  NODE_LINE="NodeName=$HOST CPUs=$SETOK_SLURM_DEV_CPUS RealMemory=$real_mem"
  SLURMD_PARAMS="SlurmdParameters=config_overrides"
  real_cpus="$SETOK_SLURM_DEV_CPUS"
fi
DEF_MEM=$((real_mem / real_cpus / 2))
[ "$DEF_MEM" -gt 2048 ] && DEF_MEM=2048
# Every node has this machine's CPUs and memory (the nodes share them: a dev cluster) and
# its own slurmd port; all are reached at 127.0.0.1.
NODE_LINES=""
NODES=""
for ((node = 0; node < NODE_COUNT; node++)); do
  name="$(node_name "$node")"
  line="NodeName=$name NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$(node_port "$node") ${NODE_LINE#NodeName=* } State=UNKNOWN"
  NODE_LINES="$NODE_LINES${NODE_LINES:+\\n}$line"
  NODES="$NODES${NODES:+,}$name"
done

if [ ! -s "$ETC/db_pass" ]; then
  (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$ETC/db_pass")
fi
DB_PASS="$(cat "$ETC/db_pass")"

render() {  # template output mode
  local tmp="$2.tmp"
  sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$HOST|g" -e "s|@CLUSTER@|$CLUSTER|g" \
    -e "s|@PARTITION@|$PARTITION|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
    -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
    -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" -e "s|@DEF_MEM@|$DEF_MEM|g" \
    -e "s|@SLURMD_PARAMS@|$SLURMD_PARAMS|g" -e "s|@NODE_LINES@|$NODE_LINES|g" \
    -e "s|@NODES@|$NODES|g" "$1" >"$tmp"
  chmod "$3" "$tmp"
  if [ -f "$2" ] && cmp -s "$tmp" "$2"; then
    rm -f "$tmp"
  else
    mv "$tmp" "$2"
    CHANGED=1
  fi
}
CHANGED=0
render "$HERE/slurm.conf.in" "$ETC/slurm.conf" 644
if [ "$CHANGED" = 1 ] && is_running slurmctld; then
  # Nodes (or anything else) changed under a running cluster: slurmctld and the slurmds
  # read slurm.conf only at start, so restart them (state and job ids are kept).
  log "slurm.conf changed: restarting slurmctld and the slurmds"
  stop_slurmds
  stop_daemon slurmctld
fi
CHANGED=0
render "$HERE/slurmdbd.conf.in" "$ETC/slurmdbd.conf" 600
if [ "$CHANGED" = 1 ] && is_running slurmdbd; then log "slurmdbd.conf changed: run down.sh && up.sh"; fi

# Let plain `sinfo`/`sbatch` (and submitit) find the cluster without SLURM_CONF, unless the
# machine already has a real slurm.conf of its own.
if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf || true)" = "$ETC/slurm.conf" ]; then
  mkdir -p /etc/slurm
  ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf
else
  log "/etc/slurm/slurm.conf exists and is not ours: export SLURM_CONF=$ETC/slurm.conf"
fi

# Start one daemon in the foreground of its own session and record its pid.
start_daemon() {  # name cmd...
  local name="$1"
  shift
  setsid "$@" >>"$LOG/$name.out" 2>&1 </dev/null &
  local pid=$!
  sleep 0.1
  record_pid "$name" "$pid"
}

# --- munge ----------------------------------------------------------------------------
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
if is_running munged; then
  :
elif munge_ok 2>/dev/null; then
  log "a munged not started by up.sh is already serving /run/munge; using it"
else
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  start_daemon munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
    --log-file="$LOG/munge/munged.log" --seed-file="$STATE/munge/munged.seed" \
    --pid-file="$STATE/munge/munged.pid"
  wait_for 15 munge_ok || { log "munged did not come up; see $LOG/munge/munged.log"; exit 1; }
fi

# --- MariaDB (accounting storage) ------------------------------------------------------
DB_SOCK="$STATE/mysql-run/mysqld.sock"
db() { mariadb --no-defaults --socket="$DB_SOCK" -uroot "$@"; }
if [ ! -d "$STATE/mysql/mysql" ]; then
  log "initialising MariaDB in $STATE/mysql"
  mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" --skip-test-db \
    --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1
fi
if ! is_running mariadbd; then
  start_daemon mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql \
    --datadir="$STATE/mysql" --socket="$DB_SOCK" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$STATE/mysql-run/mariadbd.pid" --log-error="$LOG/mariadbd.log" \
    --skip-name-resolve --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900
  wait_for 60 db -e "SELECT 1" || { log "MariaDB did not come up; see $LOG/mariadbd.log"; exit 1; }
fi
db <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# --- slurmdbd -------------------------------------------------------------------------
if ! is_running slurmdbd; then
  start_daemon slurmdbd /usr/sbin/slurmdbd -D
  wait_for 60 sacctmgr -n list cluster || { log "slurmdbd did not come up; see $LOG/slurmdbd.log"; exit 1; }
fi
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

# --- slurmctld (by the /usr/sbin name: SLURM takes its identity from argv[0]) -----------
if ! is_running slurmctld; then
  start_daemon slurmctld /usr/sbin/slurmctld -D
  wait_for 30 bash -c "scontrol ping | grep -q UP" ||
    { log "slurmctld did not come up; see $LOG/slurmctld.log"; exit 1; }
fi

# --- slurmd, one per node (-N: the node this daemon is) --------------------------------
for ((node = 0; node < NODE_COUNT; node++)); do
  record="$(slurmd_record "$node")"
  if ! is_running "$record"; then
    start_daemon "$record" /usr/sbin/slurmd -D -N "$(node_name "$node")"
  fi
done
nodes_ready() {
  local states
  states="$(sinfo -h -N -n "$NODES" -o %T)" || return 1
  [ "$(grep -Ec '^(idle|mixed|allocated|completing)' <<<"$states")" = "$NODE_COUNT" ]
}
if ! wait_for 30 nodes_ready; then
  # A node left down/drained by an earlier run: bring it back.
  scontrol update nodename="$NODES" state=resume >/dev/null 2>&1 || true
  wait_for 20 nodes_ready || { log "nodes $NODES not ready: $(sinfo -h -N -o '%N %T %E')"; exit 1; }
fi

log "up: cluster=$CLUSTER partition=$PARTITION nodes=$NODES state=$STATE"
sinfo
