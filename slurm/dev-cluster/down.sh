#!/usr/bin/env bash
# Stop the dev cluster started by up.sh: each daemon by the pid up.sh recorded (checked
# against its start time and executable), newest first. Idempotent.
#   down.sh           stop the daemons, keep state (job ids, accounting, database)
#   down.sh --purge   also delete the state directory (job ids restart at 1)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

purge=0
case "${1:-}" in
  --purge) purge=1 ;;
  "") ;;
  -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
  *) log "unknown argument: $1 (expected --purge)"; exit 2 ;;
esac

if [ -d "$RUN" ]; then
  stop_slurmds  # every node's, also of nodes an earlier up.sh had and this one does not
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[$i]}"; done
fi

if [ "$purge" = 1 ]; then
  if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null || true)" = "$ETC/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf
  fi
  case "$STATE" in
    "" | / | /var | /var/lib) log "refusing to delete $STATE"; exit 1 ;;
  esac
  rm -rf "$STATE"
  log "purged $STATE"
fi
