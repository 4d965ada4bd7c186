#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for olm's `slurm` tests and for trying hydra/launcher=slurm:
# installs Debian's slurm-wlm and munge where missing, writes a minimal slurm.conf for this machine's cores
# and memory (no cgroups, no accounting), starts munged, slurmctld and slurmd, and waits until the node is
# idle. Needs root. Idempotent: a cluster that already answers is reused; concurrent calls wait for each
# other.
#   bash scripts/slurm-cluster.sh          start (or reuse) the cluster
#   bash scripts/slurm-cluster.sh stop     stop the daemons this script started
set -euo pipefail

STATE=/var/lib/olm-slurm
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

log() { echo "slurm-cluster: $*" >&2; }

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1; }

stop() {
    for daemon in slurmd slurmctld munged; do
        if [ -f "$STATE/$daemon.pid" ]; then
            kill "$(cat "$STATE/$daemon.pid")" 2>/dev/null || true
            rm -f "$STATE/$daemon.pid"
        fi
    done
}

if [ "${1:-}" = stop ]; then
    stop
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    log "needs root (apt-get install, /etc/slurm, the daemons)"
    exit 1
fi
mkdir -p "$STATE"
exec 9>"$STATE/lock"
flock 9

case "$(command -v sinfo >/dev/null && node_state)" in
    idle|mix|alloc) log "reusing the running cluster (node $NODE $(node_state))"; exit 0 ;;
esac

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >"$STATE/apt.log" 2>&1 \
        || { cat "$STATE/apt.log" >&2; exit 1; }
fi

stop  # daemons of an earlier start that no longer answer
cpus=$(nproc)
# RealMemory in MB, a little under the total so that slurmd's own measure is never below it.
memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm /run/munge
cat >"$CONF" <<EOF
# Written by olm's scripts/slurm-cluster.sh: one node, no cgroups, no accounting.
ClusterName=olm
# Addressed over loopback: nothing of the cluster depends on the machine's name resolving or on its network.
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or preempted.
KillWait=30
MinJobAge=30
SchedulerParameters=sched_interval=1
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
# Jobs may share cores (up to 4 per core): a small job paused in a test, or waiting on I/O, holds no core idle.
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
    # 9>&-: the daemons must not inherit the lock, or the next call would wait for them forever
    su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid" 9>&- \
        || munged --force --pid-file=/run/munge/munged.pid 9>&-
    cp /run/munge/munged.pid "$STATE/munged.pid"
fi
slurmctld 9>&-
slurmd 9>&-
log "started slurmctld and slurmd ($cpus CPUs, $memory MB); waiting for node $NODE"
for _ in $(seq 120); do
    state=$(node_state || true)
    case "$state" in
        idle) log "node $NODE idle"; exit 0 ;;
        down*|drain*|inval*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
done
log "node $NODE is not idle after 60 s (state: ${state:-none}); see /var/log/slurm/"
exit 1
