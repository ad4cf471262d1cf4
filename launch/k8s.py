"""KubeRay: the RayService manifest for a raymix deployment, rendered from the same settings.

`raymix k8s [serve flags] --image IMG --gpus-per-worker 8` prints a RayService whose
serveConfigV2 imports `deployments.app:build_app` with the settings as `args`, so what runs on
Kubernetes is configured exactly like `raymix serve`. The head runs no model (no GPU); a GPU
worker group is sized for the expert shards plus the router (one GPU each).

What is trusted: raymix's pods trust each other (Ray's control plane, the data plane's
rendezvous store and its gloo/NCCL traffic are not encrypted). So the manifest closes the rest:
Ray's token authentication (`authOptions`), NetworkPolicies (the API port from the gateway only,
Ray's ports from raymix's pods and the operator only), API keys from Secrets (never in the
manifest), and containers that run as a user without privileges on a read-only root.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from cluster.config import RaymixSettings

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "raymix:0.1.0"  # built by k8s/Dockerfile on rayproject/ray:2.60.0-py311-gpu


KEY_SETTINGS = {"api_key", "api_key_file", "admin_api_key", "admin_api_key_file"}
RAY_PORTS = [6379, 8265, 10001, 8080, 52365]  # GCS, dashboard, client, metrics, the dashboard agent
SERVE_PORT = 8000


def serve_config(s: RaymixSettings) -> dict[str, Any]:
    # host/port are the Serve proxy's on Kubernetes; keys never go into the manifest (they come
    # from Secrets, as environment variables: `key_env`); the rest goes to build_app unchanged
    args = s.model_dump(exclude_defaults=True, exclude={"host", "port", "address", *KEY_SETTINGS})
    return {
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {"name": "raymix", "import_path": "deployments.app:build_app", "route_prefix": "/", "args": args}
        ],
    }


def key_env(s: RaymixSettings, name: str) -> list[dict[str, Any]]:
    """The API keys as environment variables from Secrets the operator creates (one key, or
    several comma-separated, under `keys`): present when the settings ask for keys, whose values
    are never written here; the pods wait for the Secret rather than serve without a key."""
    env = []
    for setting, var, secret in (
        (("api_key", "api_key_file"), "RAYMIX_API_KEY", f"{name}-api-keys"),
        (("admin_api_key", "admin_api_key_file"), "RAYMIX_ADMIN_API_KEY", f"{name}-admin-api-keys"),
    ):
        if any(getattr(s, f) for f in setting):
            ref = {"name": secret, "key": "keys", "optional": False}
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return env


HARDENED = {  # Ray's image runs as its user `ray` (uid 1000); nothing needs root or a capability
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
WRITABLE = [  # with a read-only root: Ray's session files, /dev/shm for its object store, caches
    ("tmp", "/tmp", {}),
    ("shm", "/dev/shm", {"medium": "Memory"}),
    ("cache", "/home/ray/.cache", {}),
]
CACHES = {
    "TRITON_CACHE_DIR": "/home/ray/.cache/triton",
    "TORCHINDUCTOR_CACHE_DIR": "/home/ray/.cache/inductor",
}


def container(
    name: str, image: str, resources: dict[str, Any], ports: list[tuple[str, int]], env: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        "env": [*env, *({"name": k, "value": v} for k, v in CACHES.items())],
        "securityContext": dict(HARDENED),
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
        "volumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            *({"name": v, "mountPath": path} for v, path, _ in WRITABLE),
        ],
    }


def rayservice(
    s: RaymixSettings,
    name: str = "raymix",
    image: str = DEFAULT_IMAGE,
    gpus_per_worker: int = 8,
    worker_cpus: int = 32,
    worker_memory: str = "256Gi",
    models_pvc: str = "raymix-models",
) -> dict[str, Any]:
    gpus_needed = s.expert_shards + s.routers  # one per expert shard and per router
    replicas = math.ceil(gpus_needed / gpus_per_worker)
    # a pod's SIGTERM drains Ray's node (its replicas' graceful shutdown: drain_timeout_s, plus
    # up to 15 s more for the shards, which serve until the router has drained): room for all
    grace = max(120, math.ceil(s.drain_timeout_s) + 60)
    volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": models_pvc, "readOnly": True}}]
    volumes += [{"name": v, "emptyDir": dict(kind)} for v, _, kind in WRITABLE]
    env = key_env(s, name)
    head = container(
        "ray-head",
        image,
        {"cpu": "4", "memory": "16Gi"},
        [("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("serve", SERVE_PORT), ("metrics", 8080)],
        env,
    )
    worker = container(
        "ray-worker",
        image,
        {"cpu": str(worker_cpus), "memory": worker_memory, "nvidia.com/gpu": str(gpus_per_worker)},
        [("metrics", 8080)],
        env,
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "raymix"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(s), sort_keys=False),
            "serviceUnhealthySecondThreshold": 900,
            "deploymentUnhealthySecondThreshold": 900,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Ray's token authentication on GCS, the dashboard and the client port: the
                # operator (KubeRay >= 1.5.1) makes the token's Secret and sets it in every pod
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": False,
                "headGroupSpec": {
                    "rayStartParams": {
                        "num-gpus": "0",
                        "dashboard-host": "0.0.0.0",
                        "metrics-export-port": "8080",
                    },
                    "template": {
                        "metadata": {"labels": {"app.kubernetes.io/name": "raymix", "ray.io/role": "head"}},
                        "spec": {
                            "terminationGracePeriodSeconds": grace,
                            "containers": [head],
                            "volumes": volumes,
                        },
                    },
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu-workers",
                        "replicas": replicas,
                        "minReplicas": replicas,
                        "maxReplicas": replicas,
                        "rayStartParams": {"metrics-export-port": "8080"},
                        "template": {
                            "metadata": {
                                "labels": {"app.kubernetes.io/name": "raymix", "ray.io/role": "worker"}
                            },
                            "spec": {
                                "terminationGracePeriodSeconds": grace,
                                "containers": [worker],
                                "volumes": volumes,
                                "tolerations": [
                                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                                ],
                            },
                        },
                    }
                ],
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the serveConfigV2) as literal blocks, as people write them; no
    anchors for repeated values (each written out)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    str,
    lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None),
)


def network_policies(
    name: str = "raymix",
    api_from: dict[str, Any] | None = None,
    operator_namespace: str = "kuberay",
    monitoring_namespace: str = "monitoring",
) -> list[dict[str, Any]]:
    """Who may reach raymix's pods: the API port (the Serve proxy's) from the gateway's pods
    only (`api_from`, a NetworkPolicy peer; default: pods labelled raymix.io/api-client=true in
    this namespace) and Prometheus (k8s/monitoring.yaml scrapes /metrics there and Ray's metrics
    port); Ray's own ports (GCS, dashboard, client, the data plane's rendezvous and gloo/NCCL)
    from raymix's pods and the KubeRay operator's namespace only."""
    pods = {"matchLabels": {"app.kubernetes.io/name": "raymix"}}
    gateway = api_from or {"podSelector": {"matchLabels": {"raymix.io/api-client": "true"}}}
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}}}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": monitoring_namespace}}}
    meta = {"labels": {"app.kubernetes.io/name": "raymix"}}

    def policy(suffix: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": f"{name}-{suffix}", **meta},
            "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": ingress},
        }

    return [
        policy(
            "api",
            [
                {"from": [gateway], "ports": [{"protocol": "TCP", "port": SERVE_PORT}]},
                {"from": [prometheus], "ports": [{"protocol": "TCP", "port": p} for p in (SERVE_PORT, 8080)]},
            ],
        ),
        policy(
            "ray",
            [
                {"from": [{"podSelector": pods}]},  # every port, between raymix's own pods
                {"from": [operator], "ports": [{"protocol": "TCP", "port": p} for p in RAY_PORTS]},
            ],
        ),
    ]


def render(s: RaymixSettings, **kwargs: Any) -> str:
    """The RayService and its NetworkPolicies, as one YAML stream; the API keys' Secrets are
    referenced, never written (`kubectl create secret generic NAME-api-keys --from-file=keys=...`)."""
    name = kwargs.get("name", "raymix")
    docs = [rayservice(s, **kwargs), *network_policies(name)]
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)
