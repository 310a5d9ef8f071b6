"""Builds the official kubernetes ApiClient the way kube-proxy picks its API server."""

from __future__ import annotations

import kubernetes
import structlog
from kubernetes.config import ConfigException

from kproxyd.config import ConfigError

log = structlog.get_logger(__name__)


def build_api_client(kubeconfig: str | None, master: str | None) -> kubernetes.client.ApiClient:
    """A kubeconfig (master overriding its server, like --master), else master alone, else in-cluster.

    Raises ConfigError when the kubeconfig or the in-cluster service account cannot be read.
    """
    try:
        return _build_api_client(kubeconfig, master)
    except (ConfigException, OSError) as err:
        raise ConfigError(
            f"no API server configuration ({'--kubeconfig ' + kubeconfig if kubeconfig else 'in-cluster'}): {err}"
        ) from None


def _build_api_client(kubeconfig: str | None, master: str | None) -> kubernetes.client.ApiClient:
    config = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)  # type: ignore[no-untyped-call]
        source = "kubeconfig"
    elif master:
        source = "master"
    else:
        kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
        source = "in-cluster"
    if master:
        config.host = master.rstrip("/")
    log.info("api client configured", source=source, server=config.host)
    return kubernetes.client.ApiClient(config)
