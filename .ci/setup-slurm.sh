#!/usr/bin/env bash
# Install and start a single-node SLURM on this machine (Debian 12, as root, without systemd),
# for the SLURM integration test (tests/test_slurm.py). Idempotent: a second call finds the node
# idle and returns at once. No accounting (no slurmdbd): the test asks the executor plugin for
# `slurm-status-command: squeue`, so MinJobAge keeps finished jobs visible to squeue.
#
# Exit 0 when `sinfo` shows the node idle; otherwise exit non-zero with one line on stderr,
# "setup-slurm: <reason>". Bounded: apt-get by SLURM_SETUP_APT_TIMEOUT (default 600 s), the
# wait for the node by SLURM_SETUP_WAIT (default 90 s).
#
# Never touches a SLURM it did not configure: an /etc/slurm/slurm.conf without this script's
# marker line, or a SLURM that answers sinfo without that file, stops it (a real cluster's login
# node must stay as it is).
set -euo pipefail

MARKER="# written by robustft .ci/setup-slurm.sh"
CONF=/etc/slurm/slurm.conf # fixed path: the job-step plugin drops SLURM_CONF for its srun
PARTITION=robustft
APT_TIMEOUT=${SLURM_SETUP_APT_TIMEOUT:-600}
WAIT=${SLURM_SETUP_WAIT:-90}
LOGDIR=/var/log/slurm

fail() {
    echo "setup-slurm: $*" >&2
    exit 1
}
log() { echo "setup-slurm: $*"; }

node_idle() {
    # "idle" or "mixed"/"allocated" once jobs run: any state that accepts work.
    local state
    state=$(timeout 10 sinfo --noheader --nodes=localhost --format=%t 2>/dev/null | head -n1)
    [[ $state =~ ^(idle|mix|alloc)$ ]]
}

if [[ -e $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
    fail "$CONF exists and was not written by this script; refusing to touch that SLURM"
fi
if [[ ! -e $CONF ]] && command -v sinfo >/dev/null && timeout 10 sinfo >/dev/null 2>&1; then
    fail "a SLURM that this script did not set up answers sinfo; refusing to touch it"
fi

# --- slurm.conf ---------------------------------------------------------------------------
# The CPUs this machine lets us use; not nproc alone, which obeys OMP_NUM_THREADS (a test
# environment sets it to 1) and would shrink the node.
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
real_memory=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
[[ $real_memory -gt 0 ]] || fail "could not read MemTotal from /proc/meminfo"
wanted=$(
    cat <<EOF
$MARKER
# One node (this machine), one partition, no accounting: for tests, not for production.
ClusterName=robustft
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups in a container: track processes by parent id, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
# A node that was down comes back by itself once slurmd registers with a valid config.
ReturnToService=2
# Finished jobs stay visible to squeue for 10 minutes: the executor plugin's squeue-based
# status checks need MinJobAge >= 3 x its first status delay (and its longest poll, 180 s).
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_memory State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)
# Already set up and running with this configuration: nothing to do (root not needed).
if [[ -e $CONF ]] && [[ $(cat "$CONF") == "$wanted" ]] && command -v sinfo >/dev/null &&
    node_idle; then
    log "ready: partition $PARTITION, node localhost idle (already running)"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || fail "must run as root (it installs packages and starts daemons)"
[[ -r /etc/debian_version ]] || fail "needs Debian (apt-get); found $(uname -s) without it"

# --- packages -----------------------------------------------------------------------------
packages=(slurm-wlm slurmctld slurmd slurm-client munge)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" ||
        missing+=("$package")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # Keep the packages' maintainer scripts from starting daemons (no systemd here): a
    # policy-rc.d that denies every start, removed again afterwards unless it was there before.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_ok=1
    timeout -s KILL "$APT_TIMEOUT" apt-get update -q >/tmp/setup-slurm-apt.log 2>&1 || apt_ok=0
    if ((apt_ok)); then
        timeout -s KILL "$APT_TIMEOUT" apt-get install -y -q --no-install-recommends \
            "${packages[@]}" >>/tmp/setup-slurm-apt.log 2>&1 || apt_ok=0
    fi
    ((own_policy)) && rm -f "$policy"
    ((apt_ok)) || fail "apt-get could not install ${missing[*]} (see /tmp/setup-slurm-apt.log)"
fi
for program in slurmctld slurmd sinfo squeue sbatch scancel munged munge; do
    command -v "$program" >/dev/null || fail "$program not found after installing ${packages[*]}"
done

# --- munge --------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start (see /var/log/munge)"
    for _ in $(seq 20); do
        timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 ||
        fail "munge credentials do not round-trip (munge -n | unmunge)"
fi

# --- slurm.conf ---------------------------------------------------------------------------
install -d -m 0755 /etc/slurm "$LOGDIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /run/slurm
restart=0
if [[ ! -e $CONF ]] || [[ $(cat "$CONF") != "$wanted" ]]; then
    log "writing $CONF (CPUs=$cpus RealMemory=${real_memory}M partition=$PARTITION)"
    printf '%s\n' "$wanted" >"$CONF"
    chmod 0644 "$CONF"
    restart=1
fi

# --- daemons ------------------------------------------------------------------------------
running() { # pid file -> the daemon it names is alive
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}
stop() { # stop the daemon this script started (by its pid file), wait for it to go
    local pidfile=$1 pid
    running "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}
if ((restart)); then
    stop /run/slurm/slurmd.pid
    stop /run/slurm/slurmctld.pid
fi
if ! running /run/slurm/slurmctld.pid; then
    log "starting slurmctld"
    slurmctld || fail "slurmctld did not start (see $LOGDIR/slurmctld.log)"
fi
if ! running /run/slurm/slurmd.pid; then
    log "starting slurmd"
    slurmd -N localhost || fail "slurmd did not start (see $LOGDIR/slurmd.log)"
fi

# --- wait until the node takes jobs --------------------------------------------------------
deadline=$((SECONDS + WAIT))
until node_idle; do
    if ((SECONDS >= deadline)); then
        state=$(timeout 10 sinfo --noheader --format='%t %E' 2>&1 | head -n1 || true)
        fail "node not idle after ${WAIT}s (sinfo: ${state:-no answer}; see $LOGDIR/)"
    fi
    running /run/slurm/slurmctld.pid || fail "slurmctld exited (see $LOGDIR/slurmctld.log)"
    running /run/slurm/slurmd.pid || fail "slurmd exited (see $LOGDIR/slurmd.log)"
    # A node left "down" by an earlier run returns once slurmd registers (ReturnToService=2);
    # nudge it in case the controller still remembers it as down.
    timeout 10 scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    sleep 1
done
log "ready: partition $PARTITION, node localhost idle ($cpus CPUs, ${real_memory}M), ${SECONDS}s"
