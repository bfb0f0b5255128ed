#!/usr/bin/env bash
# slurm-local.sh -- start/stop a throw-away single-node Slurm cluster on
# loopback, for tests.
#
# Usage:
#   eval "$(scripts/slurm-local.sh start DIR)"   # prints: export SLURM_CONF=<abs DIR>/slurm.conf
#   scripts/slurm-local.sh status DIR            # exit 0 iff the cluster in DIR is up
#   scripts/slurm-local.sh stop DIR              # idempotent; never fails
#
# Everything lives under DIR (created if missing):
#   DIR/slurm.conf           the only config; clients need just SLURM_CONF=DIR/slurm.conf
#   DIR/slurm.env            "SLURM_CONF=<abs path>" (KEY=VALUE, no shell syntax), written when up
#   DIR/READY                exists only while a started cluster is up (removed by stop)
#   DIR/munge/               munge.key (0400), munge.socket.2, munged.pid/.log/.seed
#   DIR/state/, DIR/spool/   slurmctld StateSaveLocation, slurmd SlurmdSpoolDir
#   DIR/log/                 slurmctld.log, slurmd.log, *.pid, daemon stdout/stderr
#   DIR/jobcomp.txt          jobcomp/filetxt records (one line per finished job)
#
# Clients (sbatch, squeue, scontrol, scancel, sinfo) locate munged through
# "AuthInfo=socket=..." in slurm.conf, so SLURM_CONF is the only variable
# callers need.  There is no accounting database: sacct does not work.
#
# `start` on a DIR whose cluster is still running stops it first, wipes the
# Slurm state (job ids restart at 1, no old jobs) and starts a fresh cluster;
# the munge key is kept.  Only stdout output is the export line; all
# diagnostics go to stderr.  On any failure start exits non-zero after printing
# the tails of the daemon logs to stderr.
#
# Environment knobs (optional):
#   SLURM_LOCAL_CTLD_PORT   (default 6817)   slurmctld port on 127.0.0.1
#   SLURM_LOCAL_SLURMD_PORT (default 6818)   slurmd port on 127.0.0.1
#   SLURM_LOCAL_TIMEOUT     (default 30)     seconds to wait for the node to be idle
#
# Only processes whose pid files live in DIR (and whose command line refers to
# DIR) are ever signalled.

set -euo pipefail

log() { printf 'slurm-local: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    echo "usage: $0 {start|stop|status} DIR" >&2
    exit 2
}

[[ $# -eq 2 ]] || usage
cmd=$1
dir_arg=$2

export PATH="$PATH:/usr/sbin:/sbin"
for bin in munged mungekey slurmctld slurmd sinfo scontrol squeue scancel; do
    command -v "$bin" >/dev/null 2>&1 || die "'$bin' not found (install slurm-wlm and munge)"
done

case $cmd in
    start) mkdir -p "$dir_arg" ;;
    stop|status) [[ -d $dir_arg ]] || { [[ $cmd == stop ]] && exit 0; log "no such directory: $dir_arg"; exit 1; } ;;
    *) usage ;;
esac
DIR=$(cd "$dir_arg" && pwd -P)
# slurm.conf values (e.g. AuthInfo=socket=...,) cannot hold these characters.
[[ $DIR =~ ^[A-Za-z0-9_./+@:-]+$ ]] || die "DIR must not contain spaces, commas, '=' or other special characters: $DIR"
# munged's socket path must fit in sun_path (108 bytes).
((${#DIR} + 22 <= 107)) || die "DIR path too long for a unix socket path: $DIR"

CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
MUNGE_KEY=$MUNGE_DIR/munge.key
MUNGE_PID=$MUNGE_DIR/munged.pid
LOG_DIR=$DIR/log
CTLD_PID=$LOG_DIR/slurmctld.pid
SLURMD_PID=$LOG_DIR/slurmd.pid
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
NODE=$(hostname -s)
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-30}

# Talk to *our* cluster only, whatever the caller's environment says.
export SLURM_CONF=$CONF
unset SLURM_JOB_ID SLURM_JOBID SLURM_CLUSTERS SLURM_PARTITION SBATCH_PARTITION

# pid_of NAME PIDFILE NEEDLE: print the pid if PIDFILE names a live process
# whose comm is NAME and whose command line contains NEEDLE.
pid_of() {
    local name=$1 pidfile=$2 needle=$3 pid comm cmdline
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile" 2>/dev/null || true)
    [[ -n $pid ]] || return 1
    alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$name" ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
    [[ $cmdline == *"$needle"* ]] || return 1
    echo "$pid"
}

ctld_pid()   { pid_of slurmctld "$CTLD_PID" "$CONF"; }
slurmd_pid() { pid_of slurmd "$SLURMD_PID" "$CONF"; }
munged_pid() { pid_of munged "$MUNGE_PID" "$MUNGE_SOCKET"; }

# alive PID: true if PID exists and is not a zombie (pid 1 in some sandboxes
# reaps orphans only lazily, and a zombie still answers kill -0).
alive() {
    local st
    st=$(sed -E 's/.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# stop_pid LABEL PID: SIGTERM, wait up to 10 s, then SIGKILL.
stop_pid() {
    local label=$1 pid=$2 i
    log "stopping $label (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 200; i++)); do
        alive "$pid" || return 0
        sleep 0.05
    done
    log "$label (pid $pid) did not exit after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        alive "$pid" || return 0
        sleep 0.05
    done
}

# slurmstepd processes forked by our slurmd: slurmstepd rewrites its argv and
# environ (setproctitle), but it inherits slurmd's working directory (LOG_DIR)
# and keeps slurmd's log file open.
our_stepds() {
    local p f
    for p in /proc/[0-9]*; do
        [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] || continue
        alive "${p#/proc/}" || continue
        if [[ $(readlink "$p/cwd" 2>/dev/null) == "$LOG_DIR" ]]; then
            echo "${p#/proc/}"
            continue
        fi
        for f in "$p"/fd/*; do
            if [[ $(readlink "$f" 2>/dev/null) == "$SLURMD_LOG" ]]; then
                echo "${p#/proc/}"
                break
            fi
        done
    done
}

do_stop() {
    local pid i ids
    rm -f "$DIR/READY" "$DIR/slurm.env"
    # Cancel remaining jobs first so slurmstepd/job processes do not outlive slurmd.
    if [[ -n $(ctld_pid || true) && -n $(slurmd_pid || true) && -n $(munged_pid || true) ]]; then
        ids=$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)
        if [[ -n $ids ]]; then
            log "cancelling jobs: ${ids//$'\n'/ }"
            # shellcheck disable=SC2086
            timeout 10 scancel $ids 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                [[ -z $(our_stepds) ]] && break
                sleep 0.1
            done
        fi
    fi
    if pid=$(slurmd_pid); then stop_pid slurmd "$pid"; fi
    if pid=$(ctld_pid); then stop_pid slurmctld "$pid"; fi
    for pid in $(our_stepds); do stop_pid slurmstepd "$pid"; done
    if pid=$(munged_pid); then stop_pid munged "$pid"; fi
    rm -f "$CTLD_PID" "$SLURMD_PID" "$MUNGE_PID"
}

tail_logs() {
    local f
    for f in "$MUNGE_DIR/munged.log" "$LOG_DIR/munged.out" "$CTLD_LOG" "$LOG_DIR/slurmctld.out" \
        "$SLURMD_LOG" "$LOG_DIR/slurmd.out"; do
        [[ -s $f ]] || continue
        echo "----- tail -n 40 $f -----" >&2
        tail -n 40 "$f" >&2 || true
    done
}

fail_start() {
    log "ERROR: $*"
    tail_logs
    log "stopping partially started cluster"
    do_stop || true
    exit 1
}

node_state() {
    timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1
}

is_up() {
    [[ -n $(munged_pid || true) && -n $(ctld_pid || true) && -n $(slurmd_pid || true) ]] || return 1
    case $(node_state || true) in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

write_conf() {
    local cpus mem_kb mem_mb real_mem def_mem user
    cpus=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mem_mb=$((mem_kb / 1024))
    # Leave ~10% (at least 256 MiB) headroom so slurmd never reports less than configured.
    real_mem=$((mem_mb * 90 / 100))
    ((mem_mb - real_mem >= 256)) || real_mem=$((mem_mb - 256))
    ((real_mem > 0)) || real_mem=1
    # Memory is a consumable resource (CR_Core_Memory); without a default per-CPU
    # amount a job that gives no --mem would be allocated the whole node.
    def_mem=$((real_mem / cpus))
    user=$(id -un)
    cat >"$CONF" <<EOF
# Generated by scripts/slurm-local.sh -- single-node test cluster on loopback.
ClusterName=pipetest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user

AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
PlugStackConfig=$DIR/plugstack.conf

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none

SchedulerType=sched/backfill
# A trivial job goes from sbatch to COMPLETED in ~0.1-1 s (mostly started by
# the 1 s backfill pass); dependent jobs start ~1 s after their parent ends.
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem

AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt

MinJobAge=600
ReturnToService=2
KillWait=5
InactiveLimit=0
WaitTime=0
SlurmctldTimeout=30
SlurmdTimeout=60

NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    : >"$DIR/plugstack.conf"
}

start_munged() {
    local i
    mkdir -p "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    if [[ ! -s $MUNGE_KEY ]]; then
        rm -f "$MUNGE_KEY"
        mungekey --create --keyfile="$MUNGE_KEY" >&2 ||
            { dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_KEY" status=none; }
    fi
    chmod 0400 "$MUNGE_KEY"
    # munged runs as the invoking user (root here), which owns the key.
    local force=()
    [[ $(id -u) -eq 0 ]] && force=(--force)
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged "${force[@]}" \
        --socket="$MUNGE_SOCKET" \
        --key-file="$MUNGE_KEY" \
        --pid-file="$MUNGE_PID" \
        --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        </dev/null >>"$LOG_DIR/munged.out" 2>&1 ||
        fail_start "munged failed to start"
    for ((i = 0; i < 50; i++)); do
        [[ -S $MUNGE_SOCKET && -n $(munged_pid || true) ]] && break
        sleep 0.1
    done
    [[ -S $MUNGE_SOCKET && -n $(munged_pid || true) ]] || fail_start "munged did not come up"
    if command -v munge >/dev/null && command -v unmunge >/dev/null; then
        munge --socket="$MUNGE_SOCKET" -n 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1 ||
            fail_start "munge credential round-trip failed"
    fi
}

# wait_daemon LABEL PIDFN LOG DEADLINE: wait for the daemon's pid file to name
# a live process; fail early if its log shows a fatal error.
wait_daemon() {
    local label=$1 pidfn=$2 logf=$3 deadline=$4
    until [[ -n $($pidfn || true) ]]; do
        if grep -q 'fatal' "$logf" 2>/dev/null; then fail_start "$label exited with a fatal error"; fi
        (($(date +%s) < deadline)) || fail_start "$label is not running after ${TIMEOUT}s"
        sleep 0.05
    done
}

do_start() {
    local t0 deadline state
    t0=$(date +%s.%N)
    if [[ -n $(ctld_pid || true)$(slurmd_pid || true)$(munged_pid || true) ]]; then
        log "a cluster is already running in $DIR: stopping it and starting a fresh one"
    fi
    do_stop
    rm -rf "$DIR/state" "$DIR/spool" "$LOG_DIR"
    rm -f "$DIR/jobcomp.txt"
    mkdir -p "$DIR/state" "$DIR/spool" "$LOG_DIR"
    chmod 0755 "$DIR/state" "$DIR/spool" "$LOG_DIR"

    write_conf
    start_munged

    deadline=$(($(date +%s) + TIMEOUT))

    # Slurm daemons daemonize and write their pid files; their stdio never
    # touches our stdout (so `eval "$(... start DIR)"` returns promptly).
    slurmctld -f "$CONF" </dev/null >>"$LOG_DIR/slurmctld.out" 2>&1 ||
        fail_start "slurmctld failed to start"
    wait_daemon slurmctld ctld_pid "$CTLD_LOG" "$deadline"
    until timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; do
        [[ -n $(ctld_pid || true) ]] || fail_start "slurmctld died"
        (($(date +%s) < deadline)) || fail_start "slurmctld does not answer 'scontrol ping' after ${TIMEOUT}s"
        sleep 0.1
    done

    slurmd -f "$CONF" -N "$NODE" </dev/null >>"$LOG_DIR/slurmd.out" 2>&1 ||
        fail_start "slurmd failed to start"
    wait_daemon slurmd slurmd_pid "$SLURMD_LOG" "$deadline"

    state=
    while :; do
        state=$(node_state || true)
        [[ $state == idle ]] && break
        [[ -n $(ctld_pid || true) ]] || fail_start "slurmctld died"
        [[ -n $(slurmd_pid || true) ]] || fail_start "slurmd died"
        (($(date +%s) < deadline)) || fail_start "node $NODE not idle after ${TIMEOUT}s (state: '${state:-?}')"
        sleep 0.1
    done

    printf 'SLURM_CONF=%s\n' "$CONF" >"$DIR/slurm.env"
    : >"$DIR/READY"
    log "cluster pipetest up in $DIR (node $NODE, $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s)"
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

case $cmd in
    start) do_start ;;
    stop) do_stop; log "stopped (if it was running) cluster in $DIR" ;;
    status)
        if is_up; then
            log "up: node $NODE is $(node_state)"
            printf 'export SLURM_CONF=%q\n' "$CONF"
        else
            log "down"
            exit 1
        fi
        ;;
esac
