#!/usr/bin/env bash
# The control plane: kubeadm init without the kube-proxy addon, the kproxyd image, deploy/kproxyd.yaml,
# flannel, and what the workers pick up from /kproxyd-shared: the join command, the image archive
# and a kubeconfig for the systemd pool.
# Environment (from the Vagrantfile): NODE_IP, CONTROL_PLANE_IP, POD_CIDR.
set -euo pipefail
: "${NODE_IP:?}" "${CONTROL_PLANE_IP:?}" "${POD_CIDR:?}"
export DEBIAN_FRONTEND=noninteractive
repo=/kproxyd
shared=/kproxyd-shared  # ../build/vagrant on the host, shared by every VM
export KUBECONFIG=/etc/kubernetes/admin.conf

if [[ ! -f /etc/kubernetes/admin.conf ]]; then
  # kube-proxy's addon phase is skipped: no kube-proxy DaemonSet or ConfigMap is ever created.
  kubeadm init \
    --skip-phases=addon/kube-proxy \
    --apiserver-advertise-address="$NODE_IP" \
    --control-plane-endpoint="$CONTROL_PLANE_IP:6443" \
    --pod-network-cidr="$POD_CIDR" \
    --node-name="$(hostname)"
fi
install -d -o vagrant -g vagrant /home/vagrant/.kube
install -o vagrant -g vagrant -m 600 /etc/kubernetes/admin.conf /home/vagrant/.kube/config

# The image: built here without a registry, imported into containerd, archived for worker1.
apt-get install -y -qq debootstrap podman runc >/dev/null
PYTHON=python3 "$repo/image/build.sh"
export CONTAINERS_CONF=$repo/image/containers.conf
# The DaemonSet's image kproxyd:latest is docker.io/library/kproxyd:latest to containerd.
podman tag kproxyd:latest docker.io/library/kproxyd:latest
rm -f "$shared/kproxyd-image.tar"
podman save --format docker-archive -o "$shared/kproxyd-image.tar" docker.io/library/kproxyd:latest
ctr -n k8s.io images import "$shared/kproxyd-image.tar"

# kproxyd before the CNI: it runs on the host network, tolerates the not-ready taint, and makes the
# kubernetes Service's ClusterIP work, which flannel needs to reach the API server.
sed "s#https://CONTROL_PLANE_ENDPOINT:6443#https://${CONTROL_PLANE_IP}:6443#" "$repo/deploy/kproxyd.yaml" \
  | kubectl apply -f -

# flannel on the private network (eth1), not Vagrant's NAT interface.
curl -fsSL https://github.com/flannel-io/flannel/releases/latest/download/kube-flannel.yml \
  | sed 's#- --kube-subnet-mgr#- --kube-subnet-mgr\n        - --iface=eth1#' \
  | kubectl apply -f -

kubeadm token create --print-join-command >"$shared/join.sh"

# The systemd pool's credentials: a token of the kproxyd ServiceAccount (bound, one year), the cluster CA.
token=$(kubectl -n kube-system create token kproxyd --duration=8760h)
kubectl config view --raw --minify --flatten -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' \
  | base64 -d >"$shared/ca.crt"
kubeconfig=$shared/kproxyd.kubeconfig
rm -f "$kubeconfig"
kubectl config --kubeconfig="$kubeconfig" set-cluster default \
  --server="https://${CONTROL_PLANE_IP}:6443" --certificate-authority="$shared/ca.crt" --embed-certs=true
kubectl config --kubeconfig="$kubeconfig" set-credentials kproxyd --token="$token"
kubectl config --kubeconfig="$kubeconfig" set-context default --cluster=default --user=kproxyd
kubectl config --kubeconfig="$kubeconfig" use-context default
chmod 600 "$kubeconfig"
rm -f "$shared/ca.crt"

kubectl -n kube-system rollout status daemonset/kproxyd --timeout=180s
