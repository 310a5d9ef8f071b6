#!/usr/bin/env bash
# Every node: containerd, kubeadm/kubelet/kubectl from pkgs.k8s.io, the kernel settings kubeadm checks,
# and the tools kproxyd drives. Idempotent (vagrant provision may run it again).
# Environment (from the Vagrantfile): KUBERNETES_VERSION (e.g. 1.31), NODE_IP, NODE_POOL.
set -euo pipefail
: "${KUBERNETES_VERSION:?}" "${NODE_IP:?}" "${NODE_POOL:?}"
export DEBIAN_FRONTEND=noninteractive

swapoff -a
sed -i '/\sswap\s/s/^/#/' /etc/fstab

cat >/etc/modules-load.d/kubernetes.conf <<'MODULES'
overlay
br_netfilter
MODULES
modprobe overlay
modprobe br_netfilter
cat >/etc/sysctl.d/90-kubernetes.conf <<'SYSCTL'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
SYSCTL
sysctl --system >/dev/null

apt-get update -qq
apt-get install -y -qq apt-transport-https ca-certificates curl gpg containerd \
  iptables nftables conntrack iproute2 ipset procps python3-venv python3-pip >/dev/null

# containerd with the systemd cgroup driver, as the kubelet expects.
mkdir -p /etc/containerd
containerd config default | sed 's/SystemdCgroup = false/SystemdCgroup = true/' >/etc/containerd/config.toml
systemctl restart containerd

keyring=/etc/apt/keyrings/kubernetes-apt-keyring.gpg
mkdir -p /etc/apt/keyrings
curl -fsSL "https://pkgs.k8s.io/core:/stable:/v${KUBERNETES_VERSION}/deb/Release.key" | gpg --batch --yes --dearmor -o "$keyring"
echo "deb [signed-by=$keyring] https://pkgs.k8s.io/core:/stable:/v${KUBERNETES_VERSION}/deb/ /" \
  >/etc/apt/sources.list.d/kubernetes.list
apt-get update -qq
apt-get install -y -qq kubelet kubeadm kubectl >/dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null

# The kubelet registers with the private-network address, and the node pool label that decides how
# kproxyd runs there (the DaemonSet keeps off kproxyd.io/install=systemd nodes).
echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP} --node-labels=kproxyd.io/install=${NODE_POOL}" >/etc/default/kubelet
systemctl enable kubelet
