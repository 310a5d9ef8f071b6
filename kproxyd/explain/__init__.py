"""`kproxyd explain`: walk the live kube-proxy rules for one packet (iptables or nftables mode)."""
