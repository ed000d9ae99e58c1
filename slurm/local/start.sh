#!/usr/bin/env bash
# Start a real single-node SLURM (Debian's slurm-wlm 22.05 + munge + slurmdbd/MariaDB)
# for development and CI. Idempotent: starts only what is not already running.
# Run as root. State lives in $HPCGAN_SLURM_DIR (default /var/lib/hpcgan-slurm).
# Stop with slurm/local/stop.sh (stops exactly the daemons started here, by pid file).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$(readlink -f "$0")")/common.sh"

[[ $(id -u) == 0 ]] || die "run as root (the daemons run as SlurmUser=root)"
[[ $D != *[,\ ]* ]] || die "HPCGAN_SLURM_DIR must not contain spaces or commas (it goes into AuthInfo=socket=...)"
T0=$(date +%s)

# ---------------------------------------------------------------- packages
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # Keep the packages' postinst from starting system-wide daemons (munge, mariadb,
    # slurm*) that we did not start and would not stop: policy-rc.d exit 101 = "no".
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

# ---------------------------------------------------------------- folders
install -d -m 755 "$D" "$ETC" "$RUN" "$LOG" "$D/state/ctld" "$D/state/slurmd"
install -d -m 700 "$MUNGE_DIR" "$DB_DIR"

# ---------------------------------------------------------------- slurm.conf
NODE=$(hostname -s)
CPUS=$(nproc --all)
MEM_MB=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
REAL_MB=$((MEM_MB * 95 / 100))       # a bit under the real: slurmd drains a node that has less than it advertises
DEF_MEM=$((REAL_MB / CPUS))          # jobs without --mem get a per-CPU share, so 2 jobs can share the node
# Seconds a preempted 'debug' job gets between its --signal (e.g. USR2) and SIGTERM/SIGKILL:
# time to write a checkpoint. Real clusters: minutes.
GRACE=${HPCGAN_SLURM_GRACE:-20}

new_conf=$(cat <<EOF
$MARKER
# Single-node development/CI cluster. Regenerated on every start; edit start.sh, not this.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Own munged socket; cred_expire=10: a requeued job may start again after 10 s, not 120 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$D/state/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No PMIx on the node: without this, srun tries mpi/pmix and logs errors.
MpiDefault=none
ReturnToService=2
# No cgroups needed (containers, CI runners): plain /proc process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Fast scheduling passes and kill timeout: preempt -> requeue -> run again in ~30 s.
SchedulerParameters=sched_interval=2,bf_interval=1
KillWait=10
JobRequeue=1
# Reject requests no node can ever satisfy at submission (as production clusters do), instead of
# leaving them PENDING with reason PartitionConfig forever.
EnforcePartLimits=ALL
# Real preemption: jobs in 'high' requeue jobs in 'debug'. At preemption the job gets its
# own --signal (e.g. USR2) instead of SIGTERM; TERM and KILL follow after GraceTime.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# submitit reads job states only through sacct -> accounting is required.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# slurmdbd connections ignore AuthInfo: give them the munge socket here.
AccountingStoragePass=socket=$MUNGE_SOCKET
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES PriorityTier=1 GraceTime=$GRACE MaxTime=INFINITE DefMemPerCPU=$DEF_MEM State=UP
PartitionName=high Nodes=$NODE PriorityTier=10 MaxTime=INFINITE DefMemPerCPU=$DEF_MEM State=UP
EOF
)

conf_changed=0
if [[ ! -f $ETC/slurm.conf ]] || [[ $(cat "$ETC/slurm.conf") != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" >"$ETC/slurm.conf"
    conf_changed=1
fi
# Clients look at /etc/slurm/slurm.conf by default: put an identical copy there, unless
# a config we did not write is already there (then SLURM_CONF must point to ours).
CLIENT_CONF=$(conf_path)
if [[ $CLIENT_CONF == "$SYS_CONF" ]]; then
    install -d -m 755 /etc/slurm
    cmp -s "$ETC/slurm.conf" "$SYS_CONF" || install -m 644 "$ETC/slurm.conf" "$SYS_CONF"
fi
# Daemons and our own client calls always use our folder's copy; slurmdbd finds
# slurmdbd.conf next to it.
export SLURM_CONF="$ETC/slurm.conf"

# ---------------------------------------------------------------- munged
started=()
if ! live_pid munged >/dev/null; then
    [[ -s $MUNGE_DIR/munge.key ]] || {
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chmod 400 "$MUNGE_DIR/munge.key"
    }
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$(pidfile munged)" --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
    for _ in $(seq 50); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.1; done
    log "munged started"; started+=(munged)
fi
munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null || die "munge self-test failed, see $LOG/munged.log"

# ---------------------------------------------------------------- MariaDB (accounting store)
[[ -s $ETC/db.pass ]] || { (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$ETC/db.pass"); }
DB_PASS=$(cat "$ETC/db.pass")
if ! live_pid mariadbd >/dev/null; then
    if [[ ! -d $DB_DIR/mysql ]]; then
        # --no-defaults everywhere: /etc/mysql's socket/pid/datadir belong to the system server.
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR" --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed, see $LOG/mariadb-install.log"
    fi
    rm -f "$DB_SOCKET"
    setsid mariadbd --no-defaults --user=root --datadir="$DB_DIR" --socket="$DB_SOCKET" \
        --pid-file="$(pidfile mariadbd)" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --skip-name-resolve --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --log-error="$LOG/mariadb.log" \
        </dev/null >/dev/null 2>&1 &
    for _ in $(seq 300); do
        mariadb-admin --no-defaults -uroot -S "$DB_SOCKET" ping >/dev/null 2>&1 && break; sleep 0.1
    done
    mariadb-admin --no-defaults -uroot -S "$DB_SOCKET" ping >/dev/null 2>&1 || die "MariaDB did not start, see $LOG/mariadb.log"
    log "mariadbd started (127.0.0.1:$DB_PORT)"; started+=(mariadbd)
fi
# root logs in through the unix socket; slurmdbd uses its own user over TCP.
mariadb --no-defaults -uroot -S "$DB_SOCKET" <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# ---------------------------------------------------------------- slurmdbd
(umask 077; cat >"$ETC/slurmdbd.conf.new" <<EOF
$MARKER
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
mv "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf"   # slurmdbd insists on mode 600
if ! live_pid slurmdbd >/dev/null; then
    slurmdbd
    log "slurmdbd started"; started+=(slurmdbd)
fi
# First start creates the tables; wait until it answers, then register the cluster
# (slurmctld sends no accounting for an unknown cluster).
for _ in $(seq 300); do sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1 && break; sleep 0.1; done
clusters=$(sacctmgr -n -P show cluster format=cluster) || die "slurmdbd not answering, see $LOG/slurmdbd.log"
grep -qxF "$CLUSTER" <<<"$clusters" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

# ---------------------------------------------------------------- slurmctld + slurmd
ctld_was_running=0
if live_pid slurmctld >/dev/null; then
    ctld_was_running=1
else
    slurmctld
    log "slurmctld started"; started+=(slurmctld)
fi
if ! live_pid slurmd >/dev/null; then
    slurmd
    log "slurmd started"; started+=(slurmd)
fi
if ((ctld_was_running && conf_changed)); then
    log "config changed while running: scontrol reconfigure"
    scontrol reconfigure
fi

# ---------------------------------------------------------------- wait for an idle node
state=""
for _ in $(seq 300); do
    state=$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -1 || true)
    case $state in idle | mix | alloc) break ;; esac
    sleep 0.2
done
case $state in
    idle | mix | alloc) ;;
    *) die "node $NODE is '${state:-unreachable}' after 60 s; see $LOG/slurmctld.log $LOG/slurmd.log" ;;
esac

((${#started[@]})) || log "already running (nothing started)"
log "cluster '$CLUSTER' up: node $NODE is $state (partitions debug [default], high) in $(($(date +%s) - T0)) s"
if [[ $CLIENT_CONF != "$SYS_CONF" ]]; then
    log "$SYS_CONF was not written by this script and is left alone; in every shell run:"
    log "    export SLURM_CONF=$ETC/slurm.conf"
fi
