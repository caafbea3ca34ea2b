"""deploy/: the recipes validated with the registries' own validators, and their p2pfed command lines and configs
checked against the real CLI and config classes. No container engine or cluster runs here: the images are not built,
the pods are not started (docs/DEPLOY.md says what was and was not run).

.venv/bin/python -m pytest -q tests/test_deploy.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from p2pfed.cli import main
from p2pfed.config import Config, Profile
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def _peer_args(command: list[str]) -> list[str]:
    """A compose `command` of the p2pfed image, ${VAR} placeholders replaced by well-formed values."""
    fake_id = "QmVNwHyn2Hbn4hKy2KE6VDLmgBgbmmXi1BXcLXq1udW7Yb"
    return [arg.split("${", 1)[0] + fake_id if "${BOOTSTRAP_PEER_ID" in arg else arg for arg in command]


def test_kubernetes_manifests_pass_the_schema_of_kubernetes_1_37_strictly() -> None:
    # Execute
    done = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--no-warn", *map(str, sorted((DEPLOY / "k8s").glob("*.yaml")))],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    # Assert: every resource passed (a misspelt field fails --strict)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line for line in done.stdout.splitlines() if " passed for resource " in line]
    kinds = {line.split(" passed for resource ")[1].split("/")[0] for line in passed}
    assert kinds == {"secret", "configmap", "service", "statefulset"}, done.stdout


def test_the_site_manifest_carries_a_valid_run_config_and_profile_and_mounts_the_swarm_key() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "site.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    stateful = next(d for d in docs if d["kind"] == "StatefulSet")

    cfg = Config.model_validate(yaml.safe_load(config_map["data"]["run.yaml"]))
    profile = Profile.model_validate(yaml.safe_load(config_map["data"]["profile.yaml"]))
    pod = stateful["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    secret = next(v for v in pod["volumes"] if v["name"] == "swarm")["secret"]["secretName"]

    assert cfg.privacy.swarm_key == f"{mounts['swarm']}/swarm.key" and secret == "p2pfed-swarm"
    assert cfg.checkpoint.dir == mounts["checkpoints"] and cfg.swarm.listen == "/ip4/0.0.0.0/tcp/31337"
    assert profile.device == "cuda"
    assert {p["containerPort"] for p in pod["containers"][0]["ports"]} == {31337, 9400}
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/metrics"


def test_compose_file_passes_the_compose_spec_and_its_commands_parse() -> None:
    # Execute: the compose specification's JSON schema, as vendored by check-jsonschema
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr

    # Assert: each service's command is a valid `p2pfed peer` command line
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        args = _peer_args(service["command"])
        assert args[0] == "peer", name
        ctx = main.make_context("p2pfed", list(args), resilient_parsing=False)
        sub = main.get_command(ctx, args[0])
        assert sub is not None
        sub.make_context("peer", args[1:])  # raises on an unknown option or a bad value
        config = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
        assert (ROOT / config).is_file()


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config_when_the_compose_plugin_is_present() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("docker client without the compose plugin")
    done = subprocess.run(
        ["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, env={"BOOTSTRAP_PEER_ID": "Qm" + "x" * 44, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_dockerfiles_parse_with_the_buildkit_parser() -> None:
    dockerfile = pytest.importorskip("dockerfile")
    for path in (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"):
        commands = dockerfile.parse_file(str(path))
        names = [c.cmd for c in commands]
        assert names[0] == "FROM" and "ENTRYPOINT" in names and "USER" in names, path
        copied = [c.value[0] for c in commands if c.cmd == "COPY"]
        assert all((ROOT / src).exists() for src in copied), copied


def test_skypilot_task_loads_with_skypilot() -> None:
    """SkyPilot (460 MB with what it needs) is not a dev dependency: point SKYPILOT_PYTHON at an interpreter that has
    it (`python -m venv /tmp/sky && /tmp/sky/bin/pip install skypilot`) to run this check."""
    python = os.environ.get("SKYPILOT_PYTHON")
    if not python:
        pytest.skip("SKYPILOT_PYTHON is not set (an interpreter with skypilot installed)")
    check = (
        "import sys, sky; t = sky.Task.from_yaml(sys.argv[1]); "
        "print(sorted(str(r.accelerators) for r in t.resources), sorted(t.envs))"
    )
    done = subprocess.run(
        [python, "-c", check, str(DEPLOY / "skypilot" / "site.yaml")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "A100" in done.stdout and "INITIAL_PEERS" in done.stdout
