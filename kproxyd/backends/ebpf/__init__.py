"""The eBPF dataplane: a socket load balancer on a cgroup (bcc), nftables for what it does not carry."""
