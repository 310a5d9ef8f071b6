#!/usr/bin/env bash
# A worker: join the cluster, then kproxyd the way the node's pool runs it:
#   daemonset  import the image the control plane built; the DaemonSet schedules itself here
#   systemd    install kproxyd into /opt/kproxyd/.venv and run systemd/kproxyd.service
# Environment (from the Vagrantfile): NODE_POOL.
set -euo pipefail
: "${NODE_POOL:?}"
export DEBIAN_FRONTEND=noninteractive
repo=/kproxyd
shared=/kproxyd-shared  # ../build/vagrant on the host, shared by every VM

for file in join.sh kproxyd-image.tar kproxyd.kubeconfig; do
  [[ -s $shared/$file ]] || { echo "missing $shared/$file: provision cp first (vagrant up cp)" >&2; exit 1; }
done

if [[ ! -f /etc/kubernetes/kubelet.conf ]]; then
  read -ra join <"$shared/join.sh"  # kubeadm join <endpoint> --token … --discovery-token-ca-cert-hash …
  "${join[@]}" --node-name="$(hostname)"
fi

case $NODE_POOL in
  daemonset)
    ctr -n k8s.io images import "$shared/kproxyd-image.tar"
    ;;
  systemd)
    python3 -m venv /opt/kproxyd/.venv
    /opt/kproxyd/.venv/bin/pip install -q "$repo"
    install -m 600 "$shared/kproxyd.kubeconfig" /etc/kubernetes/kproxyd.kubeconfig
    install -m 644 "$repo/systemd/kproxyd.service" /etc/systemd/system/kproxyd.service
    # The packaged flags, plus this node's name as the API server knows it.
    sed "s#^KPROXYD_ARGS=\"#KPROXYD_ARGS=\"--hostname-override=$(hostname) #" "$repo/systemd/kproxyd.default" \
      >/etc/default/kproxyd
    systemctl daemon-reload
    systemctl enable kproxyd
    systemctl restart kproxyd
    for _ in $(seq 30); do
      curl -fsS http://127.0.0.1:10256/healthz >/dev/null 2>&1 && break
      sleep 2
    done
    curl -fsS http://127.0.0.1:10256/healthz
    echo
    ;;
  *)
    echo "unknown node pool $NODE_POOL (daemonset or systemd)" >&2
    exit 1
    ;;
esac
