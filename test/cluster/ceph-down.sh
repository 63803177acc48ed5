#!/usr/bin/env bash
# Stops a cluster started by ceph-up.sh DIR and deletes DIR. Daemons get SIGKILL: the
# cluster is throw-away, and a memstore OSD spends seconds dumping its RAM on SIGTERM.
# Only processes whose command line names DIR/ceph.conf are signalled.
set -uo pipefail
DIR=${1:?usage: ceph-down.sh DIR}
[ -d "$DIR" ] || exit 0
pids=()
for f in "$DIR"/run/*.pid; do
  [ -e "$f" ] || continue
  pid=$(cat "$f" 2>/dev/null) || continue
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || continue
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$DIR/ceph.conf" || continue
  kill -KILL "$pid" 2>/dev/null && pids+=("$pid")
done
for _ in $(seq 1 100); do
  left=0
  for p in "${pids[@]}"; do [ -d "/proc/$p" ] && left=1; done
  [ "$left" = 0 ] && break
  sleep 0.05
done
rm -rf "$DIR"
