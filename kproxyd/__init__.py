"""kproxyd: a kube-proxy replacement that programs Service load balancing in the Linux kernel."""

__version__ = "0.1.0"
