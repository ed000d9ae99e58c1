#!/usr/bin/env bash
# Stop the daemons that slurm/local/start.sh started - exactly those, via their pid files
# in $HPCGAN_SLURM_DIR/run (never by process name). Idempotent: nothing running = fine.
#   --keep-jobs  leave jobs alone (default: cancel them all first, so no job processes
#                keep running without daemons and the CPUs are really free)
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
    name=${DAEMONS[i]}
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

if ((purge)); then
    [[ -n $D && $D != / ]] || die "refusing to purge '$D'"
    rm -rf -- "$D"
    if [[ -f $SYS_CONF ]] && grep -qxF "$MARKER" "$SYS_CONF"; then rm -f "$SYS_CONF"; fi
    log "purged $D"
fi
log "stopped"
