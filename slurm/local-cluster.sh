#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests and for trying slurm/train.sbatch.
# Debian 12 packages (SLURM 22.05 + munge), run as root, no systemd needed.
#
#   bash slurm/local-cluster.sh start    install the packages if missing, write /etc/slurm/slurm.conf,
#                                        start munged, slurmctld and slurmd, wait until the node is idle
#   bash slurm/local-cluster.sh stop     stop the three daemons (by their pid files)
#   bash slurm/local-cluster.sh status   daemons and sinfo
#
# `start` is idempotent: when the cluster is up and the generated config has not changed it only
# checks the node (~0.1 s); when the config changed it restarts slurmctld and slurmd (~4 s).
# A cold start on a fresh machine (apt-get update + 8 packages) takes ~10-15 s.
#
# Environment:
#   SLURM_CPUS=N          advertise N CPUs instead of the real count (oversubscription: lets a
#                         2-core machine run a 2-rank job next to its batch shell; tests use 4)
#   SLURM_STATE_DIR=DIR   state, pid files and logs (default /var/spool/slurm-test)
#   SLURM_CRED_EXPIRE=S   credential lifetime, default 10 s. A requeued job cannot start again
#                         before it expires (SLURM's default 120 s would make a requeue take
#                         ~150 s; with 10 s and a 2 s scheduler interval it takes ~12 s)
# Logs: $SLURM_STATE_DIR/log/slurmctld.log and slurmd.log.
set -euo pipefail

STATE=${SLURM_STATE_DIR:-/var/spool/slurm-test}
CONF=/etc/slurm/slurm.conf
MUNGE_PID=/run/munge/munged.pid
PACKAGES="slurmctld slurmd slurm-client munge"

die() { echo "local-cluster: $*" >&2; exit 1; }

running() {  # running PIDFILE: true if the pid in it is alive
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_daemon() {  # stop_daemon PIDFILE: SIGTERM, up to 10 s grace, then SIGKILL
  local file=$1 pid
  if ! running "$file"; then rm -f "$file"; return 0; fi
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$file"
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

install_packages() {
  # Only the four packages (8 with their dependencies). slurm-wlm is just a metapackage, and
  # Recommends would pull in ~40 packages (PMIx, MPI, ...) that a test cluster does not use.
  local missing=0 cmd
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null || missing=1
  done
  [ "$missing" = 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "SLURM is not installed and installing it needs root"
  command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get"
  echo "local-cluster: installing $PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  # Without systemd the postinst scripts cannot start the services; they say so and carry on.
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
}

start_munge() {
  # systemd would create /run/munge (RuntimeDirectory); without it we do.
  install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then   # normally made by the package's postinst
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  munge_works && return 0
  stop_daemon "$MUNGE_PID"     # a stale or broken munged
  runuser -u munge -- /usr/sbin/munged </dev/null >>"$STATE/log/munged.stdout" 2>&1
  for _ in $(seq 50); do
    munge_works && return 0
    sleep 0.1
  done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

write_config() {  # writes $CONF; prints "changed" when it differs from the one in place
  local node hw mem overrides=""
  node=$(hostname -s)
  if [ -n "${SLURM_CPUS:-}" ]; then
    # More CPUs than the machine has. slurmd would drain the node as "Low CPUs" unless told
    # to trust the config (config_overrides).
    hw="CPUs=${SLURM_CPUS}"
    overrides="SlurmdParameters=config_overrides"
  else
    # The topology slurmd detects itself; otherwise it logs "reconfigured socket/core boundaries".
    hw=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
  fi
  # A little below the real memory: a RealMemory above what slurmd finds drains the node.
  mem=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  mkdir -p /etc/slurm
  # NB: the heredoc is unquoted (variables expand), so no backticks in its comments.
  cat > "$CONF.new" <<EOF
# Written by slurm/local-cluster.sh: a one-node test cluster. Edits are overwritten.
ClusterName=localtest
# Controller and node talk over loopback; no DNS or /etc/hosts entry for the hostname needed.
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job may start again only after it (default 120 s).
AuthInfo=cred_expire=${SLURM_CRED_EXPIRE:-10}
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups: processes are tracked through /proc, tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (defaults 60 s and 30 s): requeued jobs restart promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Refuse at submission a job that can never fit (more CPUs than the node has) instead of
# leaving it pending forever, which would hang sbatch --wait and srun.
EnforcePartLimits=ALL
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=30
${overrides}
NodeName=${node} NodeAddr=127.0.0.1 ${hw} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.new" "$CONF"; then
    rm -f "$CONF.new"
  else
    mv "$CONF.new" "$CONF"
    echo changed
  fi
}

wait_for_node() {
  local node state=""
  node=$(hostname -s)
  for _ in $(seq 120); do
    state=$(sinfo -h -n "$node" -o '%T' 2>/dev/null || true)
    case "$state" in
      idle|mixed|allocated|completing) echo "local-cluster: up, node $node is $state"; return 0 ;;
      drain*|down*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  echo "local-cluster: the node did not become ready (state '$state'); last log lines:" >&2
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  return 1
}

do_start() {
  [ "$(id -u)" = 0 ] || die "must run as root (it writes /etc/slurm and runs the daemons as root)"
  install_packages
  mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log"
  start_munge
  if [ "$(write_config)" = changed ]; then
    # Daemons running with an older config read it again by restarting.
    stop_daemon "$STATE/slurmd.pid"
    stop_daemon "$STATE/slurmctld.pid"
  fi
  # Without -D both daemons fork into the background and write their pid files. Their stdio goes
  # to files, never to the caller's pipes (a test harness reading our output would wait forever).
  # -i: carry on when saved state cannot be read (a fresh state dir is the normal case).
  if ! running "$STATE/slurmctld.pid"; then
    slurmctld -i </dev/null >>"$STATE/log/slurmctld.stdout" 2>&1
  fi
  if ! running "$STATE/slurmd.pid"; then
    slurmd </dev/null >>"$STATE/log/slurmd.stdout" 2>&1
  fi
  wait_for_node
}

do_stop() {
  stop_daemon "$STATE/slurmd.pid"
  stop_daemon "$STATE/slurmctld.pid"
  stop_daemon "$MUNGE_PID"
  echo "local-cluster: stopped"
}

do_status() {
  local f rc=0
  for f in "$MUNGE_PID" "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
    if running "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
    else echo "$(basename "$f" .pid): stopped"; rc=3; fi
  done
  if [ "$rc" = 0 ]; then sinfo 2>/dev/null || true; fi
  return "$rc"
}

case "${1:-}" in
  start)  do_start ;;
  stop)   do_stop ;;
  status) do_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
