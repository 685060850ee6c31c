"""docker-compose.yml as Docker Compose itself reads it (tests/unit/test_deploy_offline.py checks it
offline against the compose-spec schema)."""

import json
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.docker


def compose(*args: str) -> subprocess.CompletedProcess:
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        pytest.skip(f"needs the Docker Compose plugin: `docker compose version` failed: {version.stderr.strip()[:200]}")
    return subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), *args],
                          capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid_for_docker_compose():
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_scales_identity_workers():
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    identity = json.loads(result.stdout)["services"]["identity"]
    assert "container_name" not in identity and not identity.get("ports"), "a fixed name or host port forbids --scale"
    assert "$(hostname)" in " ".join(identity["command"]), identity["command"]
