#!/usr/bin/env bash
# Start a real SLURM (Debian's slurm-wlm 22.05 + munge + slurmdbd/MariaDB) on this one machine
# for development and CI. Idempotent: starts only what is not already running.
#   --nodes N  N compute nodes, each slurmd in its own network + UTS namespace (node1..nodeN on
#              $HPCGAN_SLURM_SUBNET.1..N); default 1: one slurmd on this host, no namespaces.
# Run as root. State lives in $HPCGAN_SLURM_DIR (default /var/lib/hpcgan-slurm).
# Stop with slurm/local/stop.sh (stops exactly the daemons started here, by pid file).
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=common.sh
source "$HERE/common.sh"

NODES=1
while (($#)); do
    case $1 in
        --nodes) NODES=${2:-}; shift 2 || shift ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        *) die "usage: $0 [--nodes N]" ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] && ((NODES <= 250)) || die "--nodes: a number from 1 to 250"
[[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "HPCGAN_SLURM_SUBNET: three octets, e.g. 10.77.0"
[[ $(id -u) == 0 ]] || die "run as root (the daemons run as SlurmUser=root)"
[[ $D != *[,\ ]* ]] || die "HPCGAN_SLURM_DIR must not contain spaces or commas (it goes into AuthInfo=socket=...)"
T0=$(date +%s)
HOST=$(hostname -s)
if ((NODES == 1)); then
    NODE_NAMES=("$HOST")
else
    mapfile -t NODE_NAMES < <(seq -f 'node%g' "$NODES")
fi

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

# A different node layout (other --nodes) means other node names, addresses and controller
# address: reconfigure cannot do that, so stop the old cluster (jobs, daemons, namespaces) first.
# A cluster started before start.sh knew --nodes has no nodes file: it is the one-node layout.
old_layout=$(cat "$NODES_FILE" 2>/dev/null || { live_pid slurmd >/dev/null && echo "$HOST"; } || true)
if [[ -n $old_layout && $old_layout != "$(printf '%s\n' "${NODE_NAMES[@]}")" ]]; then
    log "node layout changes to ${NODE_NAMES[*]}: stopping the cluster of $(paste -sd' ' <<<"$old_layout") first"
    bash "$HERE/stop.sh"
fi
printf '%s\n' "${NODE_NAMES[@]}" >"$NODES_FILE"

# ---------------------------------------------------------------- node namespaces (--nodes > 1)
# Each node: a network namespace with a veth to the bridge. $ETC/hosts (node names -> addresses,
# as DNS has them on a real cluster) is bind-mounted over /etc/hosts for each slurmd, see below.
if ((NODES > 1)); then
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$CTLD_NET_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    { printf '127.0.0.1 localhost\n%s %s\n' "$CTLD_NET_ADDR" "$HOST"
      for i in "${!NODE_NAMES[@]}"; do echo "$SUBNET.$((i + 1)) ${NODE_NAMES[i]}"; done; } >"$ETC/hosts"
    for i in "${!NODE_NAMES[@]}"; do
        ns=$(node_ns "${NODE_NAMES[i]}")
        [[ -e /run/netns/$ns ]] || ip netns add "$ns"
        ip link show "$ns" >/dev/null 2>&1 || ip link add "$ns" type veth peer name eth0 netns "$ns"
        ip link set "$ns" master "$BRIDGE" up
        ip -n "$ns" addr replace "$SUBNET.$((i + 1))/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
fi

# ---------------------------------------------------------------- slurm.conf
CPUS=$(nproc --all)
MEM_MB=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
REAL_MB=$((MEM_MB * 95 / 100))       # a bit under the real: slurmd drains a node that has less than it advertises
DEF_MEM=$((REAL_MB / CPUS))          # jobs without --mem get a per-CPU share, so 2 jobs can share the node
# Seconds a preempted 'debug' job gets between its --signal (e.g. USR2) and SIGTERM/SIGKILL:
# time to write a checkpoint. Real clusters: minutes.
GRACE=${HPCGAN_SLURM_GRACE:-20}

# What differs with several nodes: the nodes reach the controller and slurmdbd on the bridge, not
# on 127.0.0.1 (their own loopback); per-node slurmd files (%n = node name); a dead node is
# noticed after 30 s instead of 300 s. Every node is this machine (same CPUs and memory);
# Weight makes one-node jobs take node1 first; `high` holds node1 only, so a `high` job has to
# preempt there instead of simply taking an idle node.
if ((NODES == 1)); then
    TITLE="Single-node development/CI cluster."
    CTLD_ADDR=127.0.0.1 SLURMD_FILE=slurmd SLURMD_SPOOL=$D/state/slurmd
    NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN"
    ALL_NODES=$HOST HIGH_NODES=$HOST TIMEOUTS=""
else
    TITLE="$NODES-node development/CI cluster: one network and UTS namespace per slurmd."
    CTLD_ADDR=$CTLD_NET_ADDR SLURMD_FILE=slurmd-%n SLURMD_SPOOL=$D/state/slurmd/%n
    NODE_LINES=$(for i in "${!NODE_NAMES[@]}"; do
        n=${NODE_NAMES[i]}
        echo "NodeName=$n NodeHostname=$n NodeAddr=$SUBNET.$((i + 1)) Weight=$((i + 1)) CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN"
    done)
    ALL_NODES="node[1-$NODES]" HIGH_NODES=node1
    TIMEOUTS=$'\n# A node whose slurmd stops answering is DOWN after 30 s; its jobs are requeued (JobRequeue=1).\nSlurmdTimeout=30'
fi

new_conf=$(cat <<EOF
$MARKER
# $TITLE Regenerated on every start; edit start.sh, not this.
ClusterName=$CLUSTER
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Own munged socket; cred_expire=10: a requeued job may start again after 10 s, not 120 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/$SLURMD_FILE.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/$SLURMD_FILE.log
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
KillWait=10$TIMEOUTS
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
AccountingStorageHost=$CTLD_ADDR
AccountingStoragePort=6819
# slurmdbd connections ignore AuthInfo: give them the munge socket here.
AccountingStoragePass=socket=$MUNGE_SOCKET
$NODE_LINES
PartitionName=debug Nodes=$ALL_NODES Default=YES PriorityTier=1 GraceTime=$GRACE MaxTime=INFINITE DefMemPerCPU=$DEF_MEM State=UP
PartitionName=high Nodes=$HIGH_NODES PriorityTier=10 MaxTime=INFINITE DefMemPerCPU=$DEF_MEM State=UP
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
if ((NODES == 1)); then
    if ! live_pid slurmd >/dev/null; then
        slurmd
        log "slurmd started"; started+=(slurmd)
    fi
else
    for node in "${NODE_NAMES[@]}"; do
        live_pid "slurmd-$node" >/dev/null && continue
        install -d -m 755 "$D/state/slurmd/$node"
        # Into the node's network namespace, with a UTS namespace (host name = node name, for
        # slurmd and its jobs) and a mount namespace that differs from the host's only by
        # $ETC/hosts on /etc/hosts: the file system stays shared, and host mounts propagate in
        # (slave). Not `ip netns exec`: it remounts /sys, hiding the cgroup fs slurmd needs.
        # -N: which NodeName this slurmd is.
        nsenter --net="/run/netns/$(node_ns "$node")" unshare --uts --mount --propagation slave \
            sh -c 'mount --bind "$2" /etc/hosts && hostname "$1" && exec slurmd -N "$1"' \
            sh "$node" "$ETC/hosts"
        log "slurmd of $node started"; started+=("slurmd-$node")
    done
fi
if ((ctld_was_running && conf_changed)); then
    log "config changed while running: scontrol reconfigure"
    scontrol reconfigure
fi

# ---------------------------------------------------------------- wait for idle nodes
# Up = idle, mix, alloc or comp (a node that comes back may at once run a job requeued meanwhile).
not_up() { sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 !~ /^(idle|mix|alloc|comp)$/ {print $1 ": " $2} END {if (!NR) print "none"}'; }
down=""
for _ in $(seq 300); do
    down=$(not_up || true)
    [[ -z $down ]] && break
    sleep 0.2
done
[[ -z $down ]] || die "nodes not up after 60 s: $(paste -sd, <<<"$down"); see $LOG/slurmctld.log $LOG/slurmd*.log"

((${#started[@]})) || log "already running (nothing started)"
log "cluster '$CLUSTER' up: node(s) ${NODE_NAMES[*]} up (partitions debug [default], high) in $(($(date +%s) - T0)) s"
if [[ $CLIENT_CONF != "$SYS_CONF" ]]; then
    log "$SYS_CONF was not written by this script and is left alone; in every shell run:"
    log "    export SLURM_CONF=$ETC/slurm.conf"
fi
