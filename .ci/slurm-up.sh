#!/usr/bin/env bash
# Bring up a real two-node SLURM cluster on this one host, for tests/test_slurm.py.
# Idempotent; run as root (CI runs as root with no stdin). Leaves munged, slurmctld and two slurmd running.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
CLUSTER_DIR=${SLURM_CI_DIR:-/var/spool/tunefile-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
NODES=(node1 node2)
TIMEOUT=${SLURM_UP_TIMEOUT:-60}

log() { echo "slurm-up: $*" >&2; }

# 1. Packages (skip apt when everything is already there).
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
    || ! command -v sbatch >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    log "installing slurm-wlm and munge"
    # No init system in CI containers: keep the packages' postinst from starting services.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_log=$(mktemp)
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
        </dev/null >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        log "apt-get failed"
        exit 1
    fi
    rm -f "$apt_log"
fi

mkdir -p "$CLUSTER_DIR/log" "$CONF_DIR"

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# 2. munge: a key if missing, then munged (as the munge user) unless it already answers.
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    else
        su -s /bin/sh munge -c /usr/sbin/munged
    fi
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null
fi

# 3. slurm.conf: one controller and two slurmd on this host, no cgroups, no GRES.
cpus=$(nproc)
conf_text=$(cat <<CONF
# Written by .ci/slurm-up.sh: a two-node SLURM cluster on one host, for tests.
ClusterName=tunefile-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPort=16817
SlurmctldPidFile=$CLUSTER_DIR/slurmctld.pid
SlurmctldLogFile=$CLUSTER_DIR/log/slurmctld.log
SlurmdPidFile=$CLUSTER_DIR/slurmd.%n.pid
SlurmdLogFile=$CLUSTER_DIR/log/slurmd.%n.log
SlurmdSpoolDir=$CLUSTER_DIR/slurmd.%n
StateSaveLocation=$CLUSTER_DIR/state
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$cpus RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
)
changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$conf_text" ]; then
    printf '%s\n' "$conf_text" > "$CONF"
    changed=1
fi

# Node names resolve to this host, as on a real cluster (job.sbatch rendezvous on the first node's name).
for n in "${NODES[@]}"; do
    if ! getent hosts "$n" >/dev/null 2>&1; then
        echo "127.0.0.1 $n  # .ci/slurm-up.sh" >> /etc/hosts
    fi
done

# 4. Daemons: restart ours when the config changed; start whatever is not running.
stop_pidfile() {
    if pid_alive "$1"; then
        pid=$(cat "$1")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$1"
}
if [ "$changed" = 1 ]; then
    for n in "${NODES[@]}"; do stop_pidfile "$CLUSTER_DIR/slurmd.$n.pid"; done
    stop_pidfile "$CLUSTER_DIR/slurmctld.pid"
fi
mkdir -p "$CLUSTER_DIR/state"
if ! pid_alive "$CLUSTER_DIR/slurmctld.pid"; then
    log "starting slurmctld"
    slurmctld -f "$CONF"
fi
for n in "${NODES[@]}"; do
    mkdir -p "$CLUSTER_DIR/slurmd.$n"
    if ! pid_alive "$CLUSTER_DIR/slurmd.$n.pid"; then
        log "starting slurmd -N $n"
        slurmd -f "$CONF" -N "$n"
    fi
done

# 5. Wait until both nodes are idle.
diagnose() {
    log "SLURM did not come up; diagnostics follow"
    sinfo -N -l 2>&1 || true
    scontrol show nodes 2>&1 || true
    pgrep -a 'slurm|munge' || true
    for f in "$CLUSTER_DIR"/log/*.log; do echo "==> $f"; tail -n 40 "$f"; done
}
deadline=$((SECONDS + TIMEOUT))
while :; do
    idle=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | wc -l || true)
    if [ "${idle:-0}" -ge 2 ]; then break; fi
    # A node left down/drained by an earlier run comes back on its own with ReturnToService=2
    # once its slurmd registers; nudge any that are stuck.
    for n in "${NODES[@]}"; do
        state=$(sinfo -h -n "$n" -o '%t' 2>/dev/null || true)
        case "$state" in
            down*|drain*|drng*) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
        esac
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
        diagnose
        exit 1
    fi
    sleep 1
done
log "up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
sinfo
