#!/usr/bin/env bash
# A small real cluster on one Linux machine, for trying every launcher by hand and for the
# multi-node tests: N "nodes", each a network namespace with its own address on a bridge, its
# own hostname (nodeI), and an sshd that accepts a key generated for the cluster, so that
# `ssh node1` and `pdsh -w node[0-1] hostname` work from any node as on a cluster. Needs root,
# iproute2, util-linux (unshare), openssh-server and pdsh (apt-get install openssh-server pdsh);
# --slurm also slurm-wlm and munge.
#
#   launch/local_cluster.sh up 2           # node0 (10.213.0.10), node1 (10.213.0.11)
#   launch/local_cluster.sh up 2 --slurm   # the same, plus munge, slurmctld (node0), slurmd (each):
#                                          # exec node0 sbatch/srun/sinfo work as on a Slurm cluster
#   launch/local_cluster.sh shell node0    # a shell on node0: ssh node1, pdsh -w node[0-1] ...
#   launch/local_cluster.sh exec node1 CMD # run CMD on node1 (its network, hostname, /etc)
#   launch/local_cluster.sh kill node1     # kill every process of node1, as if the host died
#   launch/local_cluster.sh status         # nodes, addresses, sshd alive or not
#   launch/local_cluster.sh down           # remove namespaces, interfaces, daemons, files
#
# Inside a node the network interface is eth0 (gloo: GLOO_SOCKET_IFNAME=eth0), the repository
# and every file are the same as on the host (one filesystem), and /etc/hosts names every node.
# Environment: CTSCALE_CLUSTER (ctscale) prefixes every name, so two clusters can coexist;
# CTSCALE_CLUSTER_NET (10.213.0) is the /24 the nodes live on (x.10, x.11, ...; the bridge x.1).
# Traffic stays inside these namespaces: nothing is routed to any other network.
set -euo pipefail

PREFIX=${CTSCALE_CLUSTER:-ctscale}
NET=${CTSCALE_CLUSTER_NET:-10.213.0}
STATE=/run/${PREFIX}-cluster          # keys, sshd configs, node list
BRIDGE=${PREFIX:0:8}br0

die() { echo "local_cluster: $*" >&2; exit 1; }
ns() { echo "${PREFIX}-$1"; }                    # node name -> namespace name
nodes() { cat "$STATE/nodes" 2>/dev/null || true; }

need() {
  [[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
  for tool in ip unshare ssh-keygen /usr/sbin/sshd pdsh; do
    command -v "$tool" > /dev/null || die "$tool not found; apt-get install iproute2 util-linux openssh-server pdsh"
  done
}

# Run a command on a node: its network namespace (with /etc/netns/NS/* over /etc, as
# `ip netns exec` does) and a UTS namespace of its own, so `hostname` is the node's name.
# `ip netns exec` mounts a fresh /sys, without the cgroup hierarchies that slurmd and a
# container runtime (podman's runc) need: they are mounted again, as on the host, inside the
# command's own mount namespace only (nothing changes outside the node).
on_node() {
  local node=$1; shift
  local setup; setup="$(cgroup_mounts)"$'\n''hostname "$0" && exec "$@"'
  ip netns exec "$(ns "$node")" unshare --uts -- sh -c "$setup" "$node" "$@"
}

# The host's cgroup mounts (/sys/fs/cgroup and below, in mount order) as shell commands.
cgroup_mounts() {
  awk '$2 ~ "^/sys/fs/cgroup" {
    printf "mkdir -p %s && mount -t %s -o %s %s %s || exit 125\n", $2, $3, $4, $1, $2
  }' /proc/self/mounts
}

up() {
  local n=${1:-2}
  [[ -z ${2:-} || $2 == --slurm ]] || die "up N [--slurm]: unknown option '$2'"
  [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 64 ]] || die "up N: N must be 1..64, got '$n'"
  need
  [[ -e $STATE/nodes ]] && die "a cluster '$PREFIX' is up already; run: $0 down"
  mkdir -p "$STATE" /run/sshd
  ssh-keygen -q -t ed25519 -N "" -C "$PREFIX-cluster" -f "$STATE/id_ed25519"
  cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local hosts="127.0.0.1 localhost"$'\n'
  for ((i = 0; i < n; i++)); do hosts+="$NET.$((10 + i)) node$i"$'\n'; done
  for ((i = 0; i < n; i++)); do
    local node=node$i name; name=$(ns "node$i")
    echo "$node" >> "$STATE/nodes"
    ip netns add "$name"
    ip link add "${PREFIX:0:8}v$i" type veth peer name eth0 netns "$name"
    ip link set "${PREFIX:0:8}v$i" master "$BRIDGE" up
    ip -n "$name" addr add "$NET.$((10 + i))/24" dev eth0
    ip -n "$name" link set eth0 up
    ip -n "$name" link set lo up
    # files `ip netns exec` mounts over /etc inside the node: names and an ssh client config
    mkdir -p "/etc/netns/$name/ssh"
    printf '%s' "$hosts" > "/etc/netns/$name/hosts"
    echo "$node" > "/etc/netns/$name/hostname"
    cat > "/etc/netns/$name/ssh/ssh_config" <<EOF
Host *
  User root
  IdentityFile $STATE/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  ConnectTimeout 5
  BatchMode yes
EOF
    mkdir -p "$STATE/$node"
    ssh-keygen -q -t ed25519 -N "" -f "$STATE/$node/host_key"
    cat > "$STATE/$node/sshd_config" <<EOF
ListenAddress $NET.$((10 + i))
HostKey $STATE/$node/host_key
PidFile $STATE/$node/sshd.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
AcceptEnv LANG LC_*
EOF
    on_node "$node" /usr/sbin/sshd -f "$STATE/$node/sshd_config"
  done
  [[ ${2:-} == --slurm ]] && slurm "$n"
  # every sshd answers before `up` returns (bounded: 10 s)
  for node in $(nodes); do
    for _ in $(seq 50); do
      on_node node0 ssh "$node" true 2> /dev/null && continue 2
      sleep 0.2
    done
    die "sshd on $node does not answer; see: $0 status"
  done
  status
}

# A Slurm cluster on the nodes: munged (one, on node0; its socket is a file every node sees),
# slurmctld on node0, slurmd on every node. Each node's /etc/slurm is this cluster's config
# (`ip netns exec` mounts /etc/netns/NS/slurm over it); slurmd gets its cgroups from on_node.
slurm() {
  local n=$1 cpus; cpus=$(nproc)
  for tool in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged; do
    [[ -x $tool ]] || die "$tool not found; apt-get install slurm-wlm munge"
  done
  local munge=$STATE/munge conf=$STATE/slurm
  mkdir -p "$munge" "$conf/ctld"
  dd if=/dev/urandom bs=1 count=1024 of="$munge/munge.key" status=none
  chown -R munge:munge "$munge"
  chmod 755 "$munge" && chmod 400 "$munge/munge.key"
  on_node node0 runuser -u munge -- /usr/sbin/munged --socket="$munge/munge.sock" \
    --key-file="$munge/munge.key" --pid-file="$munge/munged.pid" --log-file="$munge/munged.log" \
    --seed-file="$munge/munged.seed"
  {
    echo "ClusterName=$PREFIX"
    echo "SlurmctldHost=node0($NET.10)"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$munge/munge.sock"
    echo "CryptoType=crypto/munge"
    echo "MpiDefault=none"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "ReturnToService=2"
    echo "StateSaveLocation=$conf/ctld"
    echo "SlurmdSpoolDir=$conf/%n"
    echo "SlurmctldPidFile=$conf/slurmctld.pid"
    echo "SlurmdPidFile=$conf/slurmd-%n.pid"
    echo "SlurmctldLogFile=$conf/slurmctld.log"
    echo "SlurmdLogFile=$conf/slurmd-%n.log"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "KillWait=5"
    for ((i = 0; i < n; i++)); do echo "NodeName=node$i NodeAddr=$NET.$((10 + i)) CPUs=$cpus State=UNKNOWN"; done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE"
  } > "$conf/slurm.conf"
  for node in $(nodes); do
    mkdir -p "/etc/netns/$(ns "$node")/slurm"
    cp "$conf/slurm.conf" "/etc/netns/$(ns "$node")/slurm/slurm.conf"
  done
  on_node node0 /usr/sbin/slurmctld || die "slurmctld did not start; see $conf/slurmctld.log"
  for node in $(nodes); do
    on_node "$node" /usr/sbin/slurmd || die "slurmd on $node did not start; see $conf/slurmd-$node.log"
  done
  # every node idle before `up` returns (bounded: 30 s)
  for _ in $(seq 60); do
    [[ $(on_node node0 sinfo -h -o %T 2> /dev/null | sort -u) == idle ]] && return 0
    sleep 0.5
  done
  die "slurm nodes did not become idle; see $conf/*.log"
}

down() {
  for node in $(nodes); do kill_node "$node"; done
  for name in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-node" || true); do
    ip netns pids "$name" 2> /dev/null | xargs -r kill -9 2> /dev/null || true
    ip netns del "$name" 2> /dev/null || true
    rm -rf "/etc/netns/$name"
  done
  ip link del "$BRIDGE" 2> /dev/null || true
  rm -rf "$STATE"
}

# Every process of the node dies at once (kill -9), sshd included: a lost host.
kill_node() {
  local name; name=$(ns "$1")
  ip netns pids "$name" 2> /dev/null | xargs -r kill -9 2> /dev/null || true
}

status() {
  [[ -e $STATE/nodes ]] || { echo "no cluster '$PREFIX' is up"; return 0; }
  for node in $(nodes); do
    local name pids; name=$(ns "$node")
    pids=$(ip netns pids "$name" 2> /dev/null | wc -l)
    addr=$(ip -n "$name" -4 -o addr show eth0 2> /dev/null | awk '{print $4}')
    sshd=down; [[ -s $STATE/$node/sshd.pid ]] && kill -0 "$(cat "$STATE/$node/sshd.pid")" 2> /dev/null && sshd=up
    echo "$node $addr sshd=$sshd processes=$pids namespace=$name"
  done
  if [[ -e $STATE/slurm/slurm.conf ]]; then on_node node0 sinfo -h -o "slurm: %D node(s) %T"; fi
}

case "${1:-}" in
  up) up "${2:-2}" "${3:-}" ;;
  down) down ;;
  status) status ;;
  exec) [[ $# -ge 3 ]] || die "usage: $0 exec NODE CMD..."; node=$2; shift 2; on_node "$node" "$@" ;;
  shell) on_node "${2:-node0}" bash -i ;;
  kill) [[ $# -ge 2 ]] || die "usage: $0 kill NODE"; kill_node "$2" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
