"""The API client: configuration sources, and no secret ever reaches the logs."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
import yaml

from kproxyd.config import ConfigError
from kproxyd.k8s.client import build_api_client

TOKEN = "s3cr3t-token-value-0123456789"


def test_kubeconfig_token_never_logged(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": "https://192.0.2.1:6443", "insecure-skip-tls-verify": True},
                    }
                ],
                "users": [{"name": "u", "user": {"token": TOKEN}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    with structlog.testing.capture_logs() as logs:
        client = build_api_client(str(kubeconfig), None)
    assert client.configuration.host == "https://192.0.2.1:6443"
    assert logs, "configuration is logged (without secrets)"
    assert TOKEN not in repr(logs)
    assert TOKEN not in kubeconfig.read_text().replace(TOKEN, "")  # sanity: the token was in the file only


def test_unreadable_kubeconfig_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--kubeconfig .*missing"):
        build_api_client(str(tmp_path / "missing"), None)
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="--kubeconfig"):
        build_api_client(str(tmp_path / "empty"), None)
