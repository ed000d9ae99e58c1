#!/usr/bin/env bash
# Stop the daemons that slurm/local/start.sh started - exactly those, via their pid files
# in $HPCGAN_SLURM_DIR/run (never by process name) - and remove the node namespaces, veths and
# bridge of a several-node cluster. Idempotent: nothing running = fine.
#   --keep-jobs  leave jobs alone (default: cancel them all first, so no job processes
#                keep running without daemons and the CPUs are really free); with several
#                nodes the namespaces stay too, since the jobs' processes live in them
#   --purge   also delete $HPCGAN_SLURM_DIR (job state, accounting DB, logs, munge key)
#             and our /etc/slurm/slurm.conf: the next start is a fresh cluster, job ids from 1.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$(readlink -f "$0")")/common.sh"

purge=0 keep_jobs=0
for a in "$@"; do
    case $a in
        --purge) purge=1 ;;
        --keep-jobs) keep_jobs=1 ;;
        *) die "usage: $0 [--keep-jobs] [--purge]" ;;
    esac
done
export SLURM_CONF="$ETC/slurm.conf"

# Jobs' processes run under slurmstepd, not under the daemons: stopping slurmd would
# leave them running. Cancel them while the controller can still do it cleanly.
if ((!keep_jobs)) && live_pid slurmctld >/dev/null; then
    mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
    if ((${#jobs[@]})); then
        log "cancelling jobs: ${jobs[*]}"
        scancel "${jobs[@]}" 2>/dev/null || true
        for _ in $(seq 300); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.1; done
    fi
fi

# Reverse start order: slurmd/slurmctld flush state and accounting before slurmdbd and
# the database go; munge last since every SLURM daemon authenticates through it.
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    mapfile -t names < <(instances "${DAEMONS[i]}")
    for name in "${names[@]}"; do
        if pid=$(live_pid "$name"); then
            kill -TERM "$pid"
            # slurmctld saves state and mariadbd flushes InnoDB on TERM: give them time.
            for _ in $(seq 300); do alive "$pid" || break; sleep 0.1; done
            if alive "$pid"; then
                log "$name (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
            log "stopped $name (pid $pid)"
        fi
        rm -f "$(pidfile "$name")"   # stale or just stopped
    done
done

# Node namespaces: whatever still runs in one was started in it by us (a job step that outlived
# its slurmd); then the namespace, its veth (deleting one end deletes both) and the bridge go.
if ((!keep_jobs)) && [[ -s $NODES_FILE ]]; then
    while read -r node; do
        ns=$(node_ns "$node")
        [[ -e /run/netns/$ns ]] || continue
        mapfile -t left < <(ip netns pids "$ns" 2>/dev/null || true)
        if ((${#left[@]})); then
            log "killing what still runs in $ns: ${left[*]}"
            kill -KILL "${left[@]}" 2>/dev/null || true
        fi
        ip link del "$ns" 2>/dev/null || true
        ip netns del "$ns"
        log "removed namespace $ns"
    done <"$NODES_FILE"
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    rm -f "$NODES_FILE"
fi

if ((purge)); then
    [[ -n $D && $D != / ]] || die "refusing to purge '$D'"
    rm -rf -- "$D"
    if [[ -f $SYS_CONF ]] && grep -qxF "$MARKER" "$SYS_CONF"; then rm -f "$SYS_CONF"; fi
    log "purged $D"
fi
log "stopped"
