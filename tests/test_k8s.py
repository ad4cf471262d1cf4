"""k8s/: every manifest validates against KubeRay's RayService CRD schema (offline, no cluster),
and the checked-in RayService is exactly what `raymix k8s` renders from the settings."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.config import RaymixSettings
from launch.k8s import rayservice

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
# the flags k8s/rayservice.yaml was rendered with (README, "Deploying on Kubernetes")
DOCUMENTED = dict(
    model="/models/Mixtral-8x7B-Instruct-v0.1",
    expert_shards=8,
    served_model_name=["mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1"],
    max_model_len=32768,
    kv_cache_memory_mb=40000,
)


def closed(schema):
    """KubeRay's own conversion: objects that list their properties admit no others."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    if not CRD.is_file():
        pytest.skip(f"{CRD} is not beside the checkout")
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = closed(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def manifests():
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayService":
                yield path.name, doc


def test_there_is_a_rayservice():
    assert [name for name, _ in manifests()] == ["rayservice.yaml"]


@pytest.mark.parametrize("name,doc", list(manifests()))
def test_rayservices_validate_against_the_crd(validator, name, doc):
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5]
    )


def test_the_validator_catches_mistakes(validator):
    doc = rayservice(RaymixSettings(**DOCUMENTED))
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"] = {"num-gpus": 0}  # must be a string
    doc["spec"]["serveConfigV3"] = "typo"
    assert len(list(validator.iter_errors(doc))) >= 2


def test_checked_in_manifest_is_what_the_settings_render():
    ((_, doc),) = list(manifests())
    assert doc == rayservice(RaymixSettings(**DOCUMENTED))
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    assert RaymixSettings(**app["args"]).expert_shards == 8  # build_app takes these args as they are
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus * workers["replicas"] >= 8 + 1  # a GPU per shard and one for the router
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"


def test_routers_reach_build_app_and_count_in_the_gpus(validator):
    """--routers M goes to build_app's args, and every router is a GPU of its own."""
    doc = rayservice(RaymixSettings(model="/models/m", routers=3, expert_shards=6), gpus_per_worker=4)
    validator.validate(doc)
    args = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["routers"] == 3 and args["expert_shards"] == 6
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 3  # 9 GPUs on 4-GPU workers


def test_the_manifests_security_parts():
    """Keys never in the rendered YAML (Secrets referenced, pods wait for them); Ray's token
    authentication; containers without root, privileges or capabilities on a read-only root; and
    NetworkPolicies: the API port from the gateway (and Prometheus) only, Ray's ports from
    raymix's pods and the operator only. (No NetworkPolicy schema is at hand offline: its
    shape is checked here, the RayService against KubeRay's CRD above.)"""
    from launch.k8s import RAY_PORTS, render

    s = RaymixSettings(**DOCUMENTED, api_key=["sk-secret-1", "sk-secret-2"], admin_api_key=["sk-admin-3"])
    text = render(s)
    assert "sk-" not in text
    service, api, ray = yaml.safe_load_all(text)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert not {"api_key", "admin_api_key"} & set(args)
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        (c,) = pod["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        assert refs == {
            "RAYMIX_API_KEY": {"name": "raymix-api-keys", "key": "keys", "optional": False},
            "RAYMIX_ADMIN_API_KEY": {"name": "raymix-admin-api-keys", "key": "keys", "optional": False},
        }
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"] and sc["readOnlyRootFilesystem"]
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounted = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/dev/shm"} <= mounted  # what Ray writes, on a read-only root
        assert {v["name"] for v in pod["volumes"] if "emptyDir" in v} >= {"tmp", "shm"}
    for policy in (api, ray):
        assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
        assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "raymix"}}
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    gateway, prometheus = api["spec"]["ingress"]
    assert gateway["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert gateway["from"] == [{"podSelector": {"matchLabels": {"raymix.io/api-client": "true"}}}]
    assert {p["port"] for p in prometheus["ports"]} == {8000, 8080}
    own, operator = ray["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "raymix"}}}]}
    assert {p["port"] for p in operator["ports"]} == set(RAY_PORTS)
    # without keys asked for, no Secret is referenced (the API is open, as raymix serve's default)
    plain = yaml.safe_load(render(RaymixSettings(**DOCUMENTED)).split("---")[0])
    head = plain["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not [e for e in head["env"] if "valueFrom" in e]


def test_the_image_leaves_history_and_environments_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".cache", ".whl"} <= set(ignored)
