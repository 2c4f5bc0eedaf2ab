#!/usr/bin/env bash
# A real single-node SLURM cluster for volclf's tests and CI (Debian 12, SLURM 22.05, as root,
# no systemd needed).
#
#   scripts/slurm-test-cluster.sh up [--no-accounting]   install if needed, configure, start
#   scripts/slurm-test-cluster.sh down                   stop everything, wipe all state
#   scripts/slurm-test-cluster.sh status                 show the cluster; exit 0 if it is up
#
# The single node advertises the shape of a CEDIA GPU node (12 CPUs, 64 GiB, one A100) whatever
# the real machine has: CPU, memory and GPU are NOT enforced, jobs only see the allocation.
# Partitions:
#   gpu     default; PriorityTier=1, PreemptMode=REQUEUE, GraceTime=20, MaxTime=2 days
#   urgent  PriorityTier=2, PreemptMode=OFF: a job here preempts (requeues) a running gpu job
#   short   MaxTime=30 min, for "time limit above the partition's" tests
#
# With accounting (default) slurmdbd stores jobs in a private MariaDB, so `sacct` works; with
# --no-accounting there is no slurmdbd and `sacct` has nothing to say, as on some sites.
#
# `down` wipes the controller state AND the accounting database: job ids restart at 1 on the
# next `up`, and old jobs with the same ids must not linger in sacct.
#
# Environment overrides (defaults in brackets):
#   VOLCLF_SLURM_STATE_DIR [/var/spool/volclf-slurm]  StateSaveLocation, SlurmdSpoolDir
#   VOLCLF_SLURM_LOG_DIR   [/var/log/volclf-slurm]    daemon logs
#   VOLCLF_SLURM_DB_DIR    [/var/lib/volclf-slurm]    MariaDB datadir, socket, pid, log
#   VOLCLF_SLURM_RUN_DIR   [/run/volclf-slurm]        pid files, current mode
#   VOLCLF_SLURM_DB_PORT   [3307]                     MariaDB port on 127.0.0.1
#   VOLCLF_SLURM_TIMEOUT   [60]                       seconds to wait for each daemon
set -euo pipefail

STATE_DIR=${VOLCLF_SLURM_STATE_DIR:-/var/spool/volclf-slurm}
LOG_DIR=${VOLCLF_SLURM_LOG_DIR:-/var/log/volclf-slurm}
DB_DIR=${VOLCLF_SLURM_DB_DIR:-/var/lib/volclf-slurm}
RUN_DIR=${VOLCLF_SLURM_RUN_DIR:-/run/volclf-slurm}
DB_PORT=${VOLCLF_SLURM_DB_PORT:-3307}
TIMEOUT=${VOLCLF_SLURM_TIMEOUT:-60}

# Client commands (sinfo, sbatch, ...) find their configuration only in /etc/slurm; anywhere
# else they try DNS SRV records ("Could not establish a configuration source").
CONF_DIR=/etc/slurm
CLUSTER_NAME=volclf-test
NODE_NAME=localhost  # slurmd is started with -N, the machine's hostname does not matter

DB_SOCKET=$DB_DIR/mysqld.sock
DB_NAME=volclf_slurm_acct_db
DB_USER=slurm
DB_PASS=volclf-test-only  # a throwaway database reachable only on 127.0.0.1

BASE_PACKAGES=(munge slurmctld slurmd slurm-client)
ACCOUNTING_PACKAGES=(slurmdbd mariadb-server)

log() { echo "[slurm-test-cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------

# Installs the Debian packages if any of the needed programs is missing. `apt-get update` only
# runs when the install fails (stale or empty package lists), to keep CI fast and offline-ish.
install_packages() {
    local accounting=$1
    local -a packages=("${BASE_PACKAGES[@]}")
    local -a programs=(munged slurmctld slurmd sinfo sbatch)
    if [[ $accounting == 1 ]]; then
        packages+=("${ACCOUNTING_PACKAGES[@]}")
        programs+=(slurmdbd mariadbd mariadb-install-db)
    fi
    local missing=0 prog
    for prog in "${programs[@]}"; do
        command -v "$prog" >/dev/null 2>&1 || missing=1
    done
    [[ $missing == 0 ]] && return 0

    log "installing ${packages[*]}"
    # Package scripts must not start the stock services (default mariadb on port 3306, slurmd
    # with the hostname as node name, ...): we start our own. Containers usually already ship a
    # policy-rc.d that forbids it; add a temporary one otherwise.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${packages[@]}"; then
        apt-get update && apt-get install -y --no-install-recommends "${packages[@]}" || rc=$?
    fi
    [[ $own_policy == 1 ]] && rm -f "$policy"
    [[ $rc == 0 ]] || die "apt-get install failed"
}

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

write_slurm_conf() {
    local accounting=$1 storage
    if [[ $accounting == 1 ]]; then
        storage="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu"
    else
        storage="AccountingStorageType=accounting_storage/none"
    fi

    mkdir -p "$CONF_DIR"
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by volclf's scripts/slurm-test-cluster.sh: a one-node test cluster. Do not edit.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only cred_expire+1 s after it ended (default 120 s).
AuthInfo=cred_expire=10
MailProg=/bin/true

StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups and no systemd on CI machines and containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none

SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without --mem a job would get the whole node's memory and array tasks would run one at a time.
DefMemPerCPU=4096
GresTypes=gpu
# The node advertises CEDIA's shape on a smaller machine; without config_overrides it would be
# INVALID ("Low CPUs, Low RealMemory").
SlurmdParameters=config_overrides
# Refuse impossible requests at submission (too many CPUs, time above the partition's) instead
# of letting them pend forever.
EnforcePartLimits=ALL
MaxArraySize=1001

# Fast scheduling for tests: a job starts < 1 s after sbatch.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1

# Real preemption: a job in "urgent" requeues a running "gpu" job, which first gets its
# --signal (22.05 spelling; PreemptParameters=send_user_signal is fatal on 22.05).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
KillWait=5

# Finished jobs stay visible in squeue/scontrol for 5 minutes (useful without accounting).
MinJobAge=300
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
MessageTimeout=10

$storage
JobCompType=jobcomp/none

NodeName=$NODE_NAME NodeAddr=127.0.0.1 CPUs=12 RealMemory=65536 Gres=gpu:a100:1 State=UNKNOWN
PartitionName=gpu    Nodes=$NODE_NAME Default=YES MaxTime=2-00:00:00 DefaultTime=01:00:00 PriorityTier=1 PreemptMode=REQUEUE GraceTime=20 State=UP
PartitionName=urgent Nodes=$NODE_NAME MaxTime=2-00:00:00 DefaultTime=01:00:00 PriorityTier=2 PreemptMode=OFF State=UP
PartitionName=short  Nodes=$NODE_NAME MaxTime=00:30:00 DefaultTime=00:10:00 PriorityTier=1 State=UP
EOF

    # Without File= slurmd drops the GPU ("Removing file-less GPU") and the node is INVALID.
    # There is no device behind /dev/null: jobs just see CUDA_VISIBLE_DEVICES=0.
    cat >"$CONF_DIR/gres.conf" <<EOF
# Written by volclf's scripts/slurm-test-cluster.sh. A fake A100 for the test node.
AutoDetect=off
NodeName=$NODE_NAME Name=gpu Type=a100 File=/dev/null Count=1
EOF
    chmod 644 "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"
}

write_slurmdbd_conf() {
    # slurmdbd refuses a config file readable by others (it holds the database password).
    (
        umask 077
        cat >"$CONF_DIR/slurmdbd.conf" <<EOF
# Written by volclf's scripts/slurm-test-cluster.sh. Do not edit.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    )
    chmod 600 "$CONF_DIR/slurmdbd.conf"
}

# ---------------------------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------------------------

# Waits until "$@" succeeds, at most TIMEOUT seconds. Returns non-zero on timeout.
wait_for() {
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# 0 if the process runs. A zombie counts as gone: it has exited, and where PID 1 is slow to reap
# (containers, gVisor: ~2 s) waiting for it to vanish would only slow `down`.
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

# Prints the pid recorded in a pid file if that process is alive.
live_pid() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    echo "$pid"
}

# Stops the process recorded in a pid file (TERM, then KILL after 15 s); fine if none.
stop_pidfile() {
    local name=$1 pidfile=$2 pid i
    if pid=$(live_pid "$pidfile"); then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            log "$name did not stop, killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

show_logs() {
    local f
    for f in /var/log/munge/munged.log "$DB_DIR"/mysqld.err "$LOG_DIR"/slurmdbd.log \
        "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log; do
        [[ -s $f ]] || continue
        echo "----- tail of $f" >&2
        tail -n 30 "$f" >&2
    done
}

fail_up() {
    log "ERROR: $*"
    if scontrol ping >/dev/null 2>&1; then
        echo "----- sinfo -o %E (reason the node is not idle)" >&2
        sinfo -o '%N %T %E' >&2 || true
    fi
    show_logs
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Daemons, in start order
# ---------------------------------------------------------------------------------------------

munge_works() { munge -n | unmunge >/dev/null; }

start_munge() {
    if munge_works 2>/dev/null; then
        return 0  # some munged (ours or the system's) already answers on the default socket
    fi
    # The package creates the key on install; make one if it is missing.
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    # munged refuses to run as root ("Logfile is insecure: invalid ownership"): run it as munge.
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid ||
        fail_up "munged did not start"
    wait_for munge_works || fail_up "munge -n | unmunge does not work"
    cp /run/munge/munged.pid "$RUN_DIR/munged.pid"  # so that `down` stops the one we started
}

db_ping() { mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping; }

db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e "$1"; }

start_mariadb() {
    # A private server: own datadir, socket and port, bound to 127.0.0.1, pid and error log in
    # the datadir (elsewhere it crashes on permissions, as it runs as the mysql user).
    install -d -o mysql -g mysql -m 750 "$DB_DIR"
    if [[ ! -d $DB_DIR/data/mysql ]]; then
        rm -rf "$DB_DIR/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG_DIR/mariadb-install-db.log" 2>&1 ||
            { cat "$LOG_DIR/mariadb-install-db.log" >&2; fail_up "mariadb-install-db failed"; }
    fi
    # mariadbd does not daemonize itself: detach it from this shell and its output.
    setsid mariadbd --no-defaults --user=mysql --datadir="$DB_DIR/data" \
        --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$DB_DIR/mysqld.pid" --log-error="$DB_DIR/mysqld.err" \
        --skip-log-bin --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
        </dev/null >/dev/null 2>&1 &
    echo $! >"$RUN_DIR/mariadb.pid"
    wait_for db_ping || fail_up "MariaDB did not answer on $DB_SOCKET"
    # slurmdbd connects over TCP to 127.0.0.1 (with skip-name-resolve the host is the IP).
    db_sql "CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON \`$DB_NAME\`.* TO '$DB_USER'@'127.0.0.1';" ||
        fail_up "could not create the slurm database user"
}

slurmdbd_answers() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
    slurmdbd || fail_up "slurmdbd did not start"
    wait_for slurmdbd_answers || fail_up "slurmdbd does not answer (sacctmgr list cluster)"
    # Register the cluster before slurmctld starts, so that its first jobs are recorded.
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || fail_up "sacctmgr add cluster failed"
    fi
}

ctld_up() { scontrol ping | grep -q 'is UP'; }

# The state of our one node (sinfo -N prints it once per partition).
node_state() { sinfo -h -N -n "$NODE_NAME" -o %T | sort -u; }

node_idle() { [[ $(node_state 2>/dev/null) == idle ]]; }

start_slurm() {
    # slurmctld daemonizes before reading all of its configuration: exit status 0 does not mean
    # it is up. -c: start from a clean state (down wiped it anyway).
    slurmctld -c || fail_up "slurmctld did not start"
    wait_for ctld_up || fail_up "slurmctld does not answer scontrol ping"
    slurmd -N "$NODE_NAME" || fail_up "slurmd did not start"
    # A node that says drain or inval does not recover by waiting; the failure prints why.
    wait_for node_idle || fail_up "node $NODE_NAME is not idle"
}

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

# 0 if the cluster answers and its node is usable (idle, mixed or allocated).
is_up() {
    ctld_up 2>/dev/null || return 1
    local state
    state=$(node_state 2>/dev/null) || return 1
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}

current_mode() { cat "$RUN_DIR/mode" 2>/dev/null || echo none; }

cmd_up() {
    local accounting=1 mode
    while (($#)); do
        case $1 in
        --no-accounting) accounting=0 ;;
        *) die "unknown option for up: $1" ;;
        esac
        shift
    done
    mode=$([[ $accounting == 1 ]] && echo accounting || echo no-accounting)
    [[ $(id -u) == 0 ]] || die "must run as root"

    if is_up && [[ $(current_mode) == "$mode" ]]; then
        log "already up ($mode)"
        return 0
    fi
    # Anything half-started or in the other mode: start over from a clean slate.
    cmd_down

    local t0=$SECONDS
    install_packages "$accounting"
    mkdir -p "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR" "$RUN_DIR"
    # Keep the previous run's logs as *.prev: a failure must show this run's messages only.
    local f
    for f in "$LOG_DIR"/*.log; do
        [[ -e $f ]] && mv -f "$f" "$f.prev"
    done
    write_slurm_conf "$accounting"
    rm -f "$CONF_DIR/slurmdbd.conf"
    [[ $accounting == 1 ]] && write_slurmdbd_conf

    start_munge
    if [[ $accounting == 1 ]]; then
        start_mariadb
        start_slurmdbd
    fi
    start_slurm
    echo "$mode" >"$RUN_DIR/mode"
    log "up ($mode) in $((SECONDS - t0)) s"
    sinfo
}

cmd_down() {
    # Cancel jobs first so that no job processes or slurmstepd outlive slurmd.
    if ctld_up 2>/dev/null; then
        local jobs
        jobs=$(squeue -h -o %F 2>/dev/null | sort -u) || true
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 20))
            while [[ -n $(squeue -h -t R,CG,S -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do
                sleep 0.5
            done
        fi
    fi
    stop_pidfile slurmd "$RUN_DIR/slurmd.pid"
    stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
    stop_pidfile slurmdbd "$RUN_DIR/slurmdbd.pid"
    stop_pidfile mariadb "$RUN_DIR/mariadb.pid"
    stop_pidfile munged "$RUN_DIR/munged.pid"  # only a munged that `up` started

    # Fresh start next time: job ids restart at 1, so old jobs must not stay in the database.
    rm -rf "${STATE_DIR:?}/slurmctld" "${STATE_DIR:?}/slurmd" "${DB_DIR:?}/data" \
        "$DB_SOCKET" "$DB_DIR/mysqld.pid" "$DB_DIR/mysqld.err" "$RUN_DIR/mode"
    log "down"
}

cmd_status() {
    if ! ctld_up 2>/dev/null; then
        echo "slurm test cluster: down"
        return 1
    fi
    local storage
    storage=$(scontrol show config | awk -F' *= *' '$1 == "AccountingStorageType" {print $2}')
    echo "slurm test cluster: up (mode: $(current_mode), AccountingStorageType=$storage)"
    if [[ $storage == accounting_storage/slurmdbd ]]; then
        if slurmdbd_answers >/dev/null 2>&1; then
            echo "accounting: on (slurmdbd answers)"
        else
            echo "accounting: configured but slurmdbd does not answer"
        fi
    else
        echo "accounting: off (sacct has no data)"
    fi
    sinfo
    is_up
}

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

main() {
    local cmd=${1:-}
    (($#)) && shift
    case $cmd in
    up) cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) usage ;;
    esac
}

main "$@"
