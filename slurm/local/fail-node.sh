#!/usr/bin/env bash
# Crash one node of a several-node local cluster (start.sh --nodes N), as a power cut would:
# SIGKILL every process in its network namespace - its slurmd, slurmstepds and job tasks - with
# no chance to clean up. The namespace and its address stay. slurmctld marks the node DOWN after
# SlurmdTimeout (30 s) and requeues its jobs; `start.sh --nodes N` brings the node back.
#   fail-node.sh NODE   e.g. fail-node.sh node2
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$(readlink -f "$0")")/common.sh"

(($# == 1)) || die "usage: $0 NODE (e.g. node2)"
[[ $(id -u) == 0 ]] || die "run as root"
ns=$(node_ns "$1")
[[ -e /run/netns/$ns ]] || die "no namespace $ns: is $1 a node of a cluster started with --nodes N > 1?"
mapfile -t pids < <(ip netns pids "$ns")
((${#pids[@]})) || die "nothing runs on $1"
kill -KILL "${pids[@]}"
log "$1 crashed: killed ${pids[*]}"
