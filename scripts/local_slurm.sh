#!/bin/bash
# A one-node SLURM cluster on this machine, for the tests and for trying the wrappers
# (Debian: apt-get install -y slurm-wlm munge).
#   scripts/local_slurm.sh start   # config; munged, slurmctld, slurmd; waits for an idle node
#   export SLURM_CONF=...          # the line `start` and `status` print; sbatch/squeue then use it
#   scripts/local_slurm.sh status  # the daemons' PIDs and `sinfo`
#   scripts/local_slurm.sh stop    # cancels its jobs, stops exactly the daemons `start` started
# All in LOCAL_SLURM_DIR (default /tmp/local-slurm-$USER): config, munge key and socket,
# state, logs, PID files. The ports are free ones picked at start: no clash with another SLURM.
# Needs root (slurmd starts jobs as their user).
set -euo pipefail

DIR="${LOCAL_SLURM_DIR:-/tmp/local-slurm-$(id -un)}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

write_conf() {
    local ctld_port slurmd_port mem
    ctld_port="$(free_port)"
    slurmd_port="$(free_port)"
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    # linuxproc/none: no cgroups needed; cons_tres + CR_CPU: a job per free CPU, memory not counted.
    cat > "$CONF" <<EOF
ClusterName=local
SlurmctldHost=$HOST
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=300
KillWait=5
SlurmdTimeout=30
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
NodeName=$HOST CPUs=$(getconf _NPROCESSORS_ONLN) RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    mungekey --create --keyfile="$DIR/munge/munge.key"
    # As the user running this script (--force lets root run it): a munge user could not reach a
    # state dir inside a private temp dir such as pytest's.
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" ||
        die "munged did not start (log: $DIR/munge/munged.log)"
    cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
}

wait_idle() {
    local i
    for i in $(seq 1 100); do
        if SLURM_CONF="$CONF" sinfo -h -N -o '%t' 2>/dev/null | grep -qx 'idle'; then
            return 0
        fi
        alive slurmctld || die "slurmctld stopped (log: $DIR/log/slurmctld.log)"
        alive slurmd || die "slurmd stopped (log: $DIR/log/slurmd.log)"
        sleep 0.2
    done
    die "the node did not become idle within 20 s (logs: $DIR/log/)"
}

start() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null ||
        die "slurmctld or munged not found; install them: apt-get install -y slurm-wlm munge"
    [ "$(id -u)" -eq 0 ] || die "needs root (slurmd starts jobs as their user); run it with sudo"
    if alive slurmctld || alive slurmd || alive munged; then
        echo "already running in $DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    write_conf
    start_munge
    # -D: in the foreground of a background shell job, so $! is the daemon's own PID.
    slurmctld -D -i -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 &
    echo $! > "$DIR/slurmctld.pid"
    slurmd -D -f "$CONF" -N "$HOST" >>"$DIR/log/slurmd.out" 2>&1 &
    echo $! > "$DIR/slurmd.pid"
    wait_idle
    echo "local SLURM running in $DIR (node $HOST, $(getconf _NPROCESSORS_ONLN) CPUs)"
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # $1: name of a PID file of ours; TERM, then KILL after 10 s
    local pid i
    [ -f "$DIR/$1.pid" ] || return 0
    pid="$(cat "$DIR/$1.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$DIR/$1.pid"
}

stop() {
    local i running
    if alive slurmctld; then  # jobs first: their slurmstepd processes outlive slurmd otherwise
        SLURM_CONF="$CONF" scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
        for i in $(seq 1 50); do
            running="$(SLURM_CONF="$CONF" squeue -h -t running,completing -o %i 2>/dev/null)"
            [ -z "$running" ] && break
            sleep 0.2
        done
    fi
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    echo "local SLURM in $DIR stopped"
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$name"; then
            echo "$name: running, pid $(cat "$DIR/$name.pid")"
        else
            echo "$name: stopped"
        fi
    done
    if alive slurmctld; then
        SLURM_CONF="$CONF" sinfo
        echo "export SLURM_CONF=$CONF"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status (state: LOCAL_SLURM_DIR, default /tmp/local-slurm-\$USER)";;
esac
