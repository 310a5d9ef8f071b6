"""kube-proxy's IPVS mode: IPVS virtual services plus the ipset-based iptables rules kube-proxy pairs with them."""
