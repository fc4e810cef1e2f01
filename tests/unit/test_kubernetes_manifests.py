"""deploy/kubernetes/: the example overlay, rendered (by a small renderer for what the kustomizations use, checked
against `kubectl kustomize` where kubectl is installed), validates offline against the Kubernetes 1.37 API
schemas; the cert-manager Certificate (a CRD, not in those schemas) is checked by hand; and the settings,
policies, mounts and probes agree with what the gateway reads."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import environment_settings, file_settings, load_settings
from gateway.policy import load_policies

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes" / "base"
OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "example"
KUBERNETES_VERSION = "1.37.0"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
RENDERED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
POD_NAME = "gateway-0"  # a StatefulSet's pod, as the downward API's metadata.name gives it
# After drain and grace: the audit trail's last records and close, and the kubelet's own delays.
STOP_MARGIN_S = 5


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` prints, for the fields these kustomizations use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= RENDERED_FIELDS, f"the renderer does not know {set(kustomization) - RENDERED_FIELDS}"
    objects: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = directory / entry
        objects += render(path) if path.is_dir() else [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        merge(find(objects, change["kind"], change["metadata"]["name"]), change)
    for image in kustomization.get("images", []):
        for container in containers(objects):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image['newName']}:{image['newTag']}"
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def merge(target: dict[str, Any], change: dict[str, Any]) -> None:
    """A strategic merge as far as the patches go: mappings merge, anything else is replaced."""
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] == "StatefulSet"]
    return [c for pod in pods for c in pod.get("initContainers", []) + pod["containers"]]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(OVERLAY)


@pytest.fixture(scope="module")
def pod(rendered) -> dict[str, Any]:
    return find(rendered, "StatefulSet", "gateway")["spec"]["template"]["spec"]


def pod_environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as the kubelet sets them in pod POD_NAME: ``$(NAME)`` expands a variable defined
    before it."""
    environ: dict[str, str] = {}
    for variable in container.get("env", []):
        if "valueFrom" in variable:
            assert variable["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, "a source not rendered here"
            environ[variable["name"]] = POD_NAME
        else:
            environ[variable["name"]] = re.sub(r"\$\((\w+)\)", lambda m: environ[m[1]], variable["value"])
    return environ


@pytest.fixture(scope="module")
def settings(rendered, pod, tmp_path_factory):
    """The settings of the gateway in pod POD_NAME: its ConfigMap's gateway.yaml and its GATEWAY_* variables."""
    config = tmp_path_factory.mktemp("config") / "gateway.yaml"
    config.write_text(find(rendered, "ConfigMap", "gateway-config")["data"]["gateway.yaml"])
    (gateway,) = pod["containers"]
    # Unknown keys or variables and bad values are errors naming them; so is a chain id no pod name could give.
    return load_settings(config, None, environment_settings(pod_environment(gateway)))


def key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def test_renderer_matches_kustomize(rendered):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer alone renders the overlay")
    result = subprocess.run([kubectl, "kustomize", OVERLAY], capture_output=True, text=True, timeout=60, check=True)
    by_kustomize = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(by_kustomize, key=key) == sorted(rendered, key=key)


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_built_in_kinds_validate_against_the_kubernetes_api_schemas(directory):
    objects = render(directory)
    built_in = [o for o in objects if o["kind"] != "Certificate"]
    assert {o["kind"] for o in built_in} == {
        "ConfigMap", "PersistentVolumeClaim", "StatefulSet", "Service", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "NetworkPolicy",
    }  # fmt: skip
    for obj in built_in:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises, naming the field


def test_validation_catches_a_misspelled_field(rendered):
    deployment = find(rendered, "StatefulSet", "gateway")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_certificate_issues_the_mounted_secret_for_the_configured_server_names(rendered, pod, settings):
    certificate = find(rendered, "Certificate", "gateway")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    assert set(spec) <= {"secretName", "duration", "renewBefore", "commonName", "dnsNames", "usages", "privateKey",
                         "issuerRef"}  # fmt: skip
    tls_secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v and v["name"] == "tls"}
    assert tls_secrets == {spec["secretName"]}
    assert set(settings.tls.server_names) <= set(spec["dnsNames"])
    assert "server auth" in spec["usages"]
    assert spec["privateKey"]["rotationPolicy"] == "Never"  # the pod's private copy of the key stays valid
    assert spec["issuerRef"]["kind"] in {"Issuer", "ClusterIssuer"} and spec["issuerRef"]["name"]
    assert re.fullmatch(r"\d+h", spec["duration"]) and re.fullmatch(r"\d+h", spec["renewBefore"])


def test_statefulset_runs_three_spread_locked_down_replicas(rendered, pod):
    assert find(rendered, "StatefulSet", "gateway")["spec"]["replicas"] == 3
    assert pod["affinity"]["podAntiAffinity"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in containers(rendered):
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        }
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert container["image"] == "registry.example.com/gateway:0.1.0"


def test_secrets_are_mounted_for_the_gateways_group_alone(pod):
    secret_modes = [v["secret"]["defaultMode"] for v in pod["volumes"] if "secret" in v]
    secret_modes += [v["projected"]["defaultMode"] for v in pod["volumes"] if "projected" in v]
    assert secret_modes and set(secret_modes) == {0o440}


def test_private_keys_reach_the_gateway_as_its_own_0600_files(pod, settings):
    init, audit_key = pod["initContainers"]
    assert init["command"][:3] == audit_key["command"][:3] == ["install", "-m", "0600"]
    private = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "private")
    copied = {f"{private}/{Path(source).name}" for source in init["command"][3:-1]}
    assert copied == {str(settings.tls.key)}
    assert audit_key["command"][-1] == str(settings.audit.hmac_key_file)
    assert Path(settings.audit.hmac_key_file).parent == Path(private)


def test_probes_use_the_probe_listener(pod, settings):
    (gateway,) = pod["containers"]
    probe_port = int(settings.health.listen.rsplit(":", 1)[1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["grpc"] == {"port": probe_port}
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["grpc"] == int(settings.listen.rsplit(":", 1)[1]) and ports["probe"] == probe_port


def test_termination_sequence_fits_the_drain_and_the_grace_period(pod, settings):
    """On SIGTERM the gateway says NOT_SERVING but serves on for shutdown_drain_s; the readiness probe must fail
    within it, so that the endpoint is removed before the listener closes; then the calls in flight get
    shutdown_grace_s, and all of it must end before the kubelet's SIGKILL."""
    (gateway,) = pod["containers"]
    readiness = gateway["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= settings.shutdown_drain_s
    stop_s = settings.shutdown_drain_s + settings.shutdown_grace_s + STOP_MARGIN_S
    assert stop_s <= pod["terminationGracePeriodSeconds"]
    assert "lifecycle" not in gateway  # a preStop hook would spend the grace period before SIGTERM


def test_each_pod_writes_its_own_audit_chain_named_after_it_to_its_own_folder(pod, settings):
    (gateway,) = pod["containers"]
    audit_mount = next(m for m in gateway["volumeMounts"] if m["name"] == "audit")
    assert settings.audit.chain_id == POD_NAME and settings.workers == 1
    assert settings.audit.path == Path(audit_mount["mountPath"]) / POD_NAME / "audit.log"
    assert "audit" not in {v["name"] for v in pod["volumes"]}  # the claim template's: the trail outlives the pod


def test_only_volumes_are_writable(pod):
    (gateway,) = pod["containers"]
    writable = {m["name"] for m in gateway["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"audit", "tmp"}


def test_service_pdb_hpa_and_network_policy_point_at_the_gateway(rendered, pod):
    labels = find(rendered, "StatefulSet", "gateway")["spec"]["template"]["metadata"]["labels"]
    grpc_port = [{"name": "grpc", "port": 50051, "targetPort": "grpc", "appProtocol": "grpc"}]
    for name in ("gateway", "gateway-headless"):  # the ClusterIP, and the DNS records of client-side balancing
        service = find(rendered, "Service", name)["spec"]
        assert service["selector"].items() <= labels.items() and service["ports"] == grpc_port
        assert service.get("clusterIP") == (None if name == "gateway" else "None")
        assert not service.get("publishNotReadyAddresses")  # a draining pod leaves DNS as it leaves the endpoints
    assert find(rendered, "PodDisruptionBudget", "gateway")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = find(rendered, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "gateway"}
    assert hpa["minReplicas"] == 3
    network = find(rendered, "NetworkPolicy", "gateway")["spec"]
    assert network["podSelector"]["matchLabels"].items() <= labels.items()
    named_ports = {p["name"] for p in pod["containers"][0]["ports"]}
    assert {p["port"] for rule in network["ingress"] for p in rule["ports"]} <= named_ports


def test_every_referenced_object_is_rendered_or_made_as_docs_deploy_says(rendered, pod):
    rendered_names = {key(o) for o in rendered}
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in rendered_names
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in rendered_names
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    secrets |= {s["secret"]["name"] for v in pod["volumes"] if "projected" in v for s in v["projected"]["sources"]}
    by_cert_manager = {o["spec"]["secretName"] for o in rendered if o["kind"] == "Certificate"}
    documented = set(re.findall(r"create secret generic (\S+)", (ROOT / "docs" / "deploy.md").read_text()))
    assert secrets == by_cert_manager | documented


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_gateway_settings_and_policies_load(directory, tmp_path):
    objects = render(directory)
    config = tmp_path / "gateway.yaml"
    config.write_text(find(objects, "ConfigMap", "gateway-config")["data"]["gateway.yaml"])
    assert file_settings(config).workers == 1  # one audit chain per pod
    policies = tmp_path / "policies"
    policies.mkdir()
    for name, text in find(objects, "ConfigMap", "gateway-policies")["data"].items():
        (policies / name).write_text(text)
    assert load_policies(policies).rules


def test_each_pod_has_its_own_audit_volume_which_outlives_it(rendered):
    # One volume per pod (issue 27: with one shared volume, a compromised pod could rewrite every pod's trail).
    statefulset = find(rendered, "StatefulSet", "gateway")["spec"]
    assert not [
        o for o in rendered if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "gateway-audit"
    ]
    (claim,) = [c for c in statefulset["volumeClaimTemplates"] if c["metadata"]["name"] == "audit"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert statefulset["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    pod = statefulset["template"]["spec"]
    assert "audit" not in {v["name"] for v in pod["volumes"]}  # the claim template's volume, not a shared claim


def test_each_pod_has_its_own_audit_key_and_the_gateway_sees_no_other(rendered, settings):
    pod = find(rendered, "StatefulSet", "gateway")["spec"]["template"]["spec"]
    (copier,) = [c for c in pod["initContainers"] if c["name"] == "audit-key"]
    assert pod_environment(copier) == {"POD_NAME": POD_NAME}
    source = next(m["mountPath"] for m in copier["volumeMounts"] if m["name"] == "audit-keys")
    assert copier["command"] == ["install", "-m", "0600", f"{source}/$(POD_NAME)", str(settings.audit.hmac_key_file)]
    (keys,) = [v for v in pod["volumes"] if v["name"] == "audit-keys"]
    assert keys["secret"]["secretName"] == "gateway-audit-keys"
    # Only the copier mounts the set of keys: the gateway's container (and so a compromised gateway) holds its own.
    mounting = [c["name"] for c in pod["initContainers"] + pod["containers"]
                if "audit-keys" in {m["name"] for m in c["volumeMounts"]}]  # fmt: skip
    assert mounting == ["audit-key"]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    hpa = find(rendered, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert f"seq 0 {hpa['maxReplicas'] - 1}" in docs  # a key for every pod the autoscaler may start
