# Shared by up.sh and down.sh (sourced, not run): paths and pid bookkeeping.
#
# Every daemon runs in the foreground of its own session; up.sh records "pid starttime exe"
# in $RUN/<name>.pid so that down.sh stops exactly the process it started (never by name).

STATE="${SETOK_SLURM_DEV_DIR:-/var/lib/setok-slurm-dev}"
ETC="$STATE/etc"
RUN="$STATE/run"
LOG="$STATE/log"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SLURM_CONF="$ETC/slurm.conf"

# Ports (override to run next to another SLURM or MariaDB).
CTLD_PORT="${SETOK_SLURM_DEV_CTLD_PORT:-6817}"
SLURMD_PORT="${SETOK_SLURM_DEV_SLURMD_PORT:-6818}"
DBD_PORT="${SETOK_SLURM_DEV_DBD_PORT:-6819}"
DB_PORT="${SETOK_SLURM_DEV_DB_PORT:-3316}"
CLUSTER="${SETOK_SLURM_DEV_CLUSTER:-setokdev}"
PARTITION="${SETOK_SLURM_DEV_PARTITION:-dev}"

# Nodes: one slurmd per node on this machine (Debian builds slurmd with MULTIPLE_SLURMD: `-N`
# names the node). Node 0 is this host's short name (MASTER_ADDR of a multi-node job is the
# first node's name, so it must resolve); node i > 0 is "<host>-n<i>" on port
# SLURMD_PORT + 1 + i (DBD_PORT takes SLURMD_PORT + 1 by default), each with its own spool
# dir, log and pid file (slurm.conf's %n).
HOST="$(hostname -s)"
NODE_COUNT="${SETOK_SLURM_DEV_NODES:-2}"
node_name() { if [ "$1" = 0 ]; then echo "$HOST"; else echo "$HOST-n$1"; fi; }
node_port() { if [ "$1" = 0 ]; then echo "$SLURMD_PORT"; else echo $((SLURMD_PORT + 1 + $1)); fi; }
# pid record of node i's slurmd ("slurmd" for node 0, as before there were several)
slurmd_record() { if [ "$1" = 0 ]; then echo slurmd; else echo "slurmd-n$1"; fi; }

# Daemons in start order; down.sh stops them in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld)
for ((node = 0; node < NODE_COUNT; node++)); do DAEMONS+=("$(slurmd_record "$node")"); done

log() { printf '[setok-slurm-dev] %s\n' "$*" >&2; }

# starttime (clock ticks since boot) of a pid, empty when it is gone.
proc_start() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"  # drop "pid (comm) "; comm may hold spaces
  # After the comm field, field 3 is index 0 here; starttime is field 22 -> index 19.
  # shellcheck disable=SC2206
  local fields=($stat)
  echo "${fields[19]}"
}

proc_state() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  echo "${stat%% *}"
}

# Record a freshly started daemon.
record_pid() {  # name pid
  local exe
  exe="$(readlink "/proc/$2/exe" 2>/dev/null || true)"
  echo "$2 $(proc_start "$2") $exe" >"$RUN/$1.pid.tmp"
  mv "$RUN/$1.pid.tmp" "$RUN/$1.pid"
}

# True when the recorded daemon is alive (same pid, start time and executable; not a zombie).
is_running() {  # name
  local file="$RUN/$1.pid" pid start exe
  [ -f "$file" ] || return 1
  read -r pid start exe <"$file" || return 1
  [ -n "$pid" ] || return 1
  [ "$(proc_start "$pid")" = "$start" ] || return 1
  [ "$(readlink "/proc/$pid/exe" 2>/dev/null || true)" = "$exe" ] || return 1
  [ "$(proc_state "$pid")" != "Z" ] || return 1
}

recorded_pid() {  # name
  local pid _rest
  read -r pid _rest <"$RUN/$1.pid"
  echo "$pid"
}

# Wait until "$@" succeeds, up to $1 seconds (first argument), polling every 0.2 s.
wait_for() {  # seconds cmd...
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then return 1; fi
    sleep 0.2
  done
}

# Stop a daemon up.sh recorded (SIGTERM, then SIGKILL after 20 s); no-op when it is gone.
stop_daemon() {  # name
  local name="$1" file="$RUN/$1.pid" pid
  [ -f "$file" ] || return 0
  if ! is_running "$name"; then
    rm -f "$file"
    return 0
  fi
  pid="$(recorded_pid "$name")"
  kill -TERM "$pid" 2>/dev/null || true
  # A stopped daemon may linger as <defunct> for a few seconds: is_running counts that as gone.
  if ! wait_for 20 bash -c "! { source '$HERE/common.sh'; is_running '$name'; }"; then
    log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_for 5 bash -c "! { source '$HERE/common.sh'; is_running '$name'; }" || true
  fi
  rm -f "$file"
  log "stopped $name (pid $pid)"
}

# Stop every node's slurmd that up.sh recorded.
stop_slurmds() {
  local file
  for file in "$RUN"/slurmd.pid "$RUN"/slurmd-n*.pid; do
    [ -f "$file" ] || continue
    file="${file##*/}"
    stop_daemon "${file%.pid}"
  done
}
