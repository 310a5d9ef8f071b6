"""kube-proxy's nftables mode: one `kube-proxy` table of verdict maps and per-ServicePort chains."""
