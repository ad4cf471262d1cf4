"""KubeRay: the RayService manifest for a raymix deployment, rendered from the same settings.

`raymix k8s [serve flags] --image IMG --gpus-per-worker 8` prints a RayService whose
serveConfigV2 imports `deployments.app:build_app` with the settings as `args`, so what runs on
Kubernetes is configured exactly like `raymix serve`. The head runs no model (no GPU); a GPU
worker group is sized for the expert shards plus the router (one GPU each).
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from cluster.config import RaymixSettings

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "raymix:0.1.0"  # built by k8s/Dockerfile on rayproject/ray:2.60.0-py311-gpu


def serve_config(s: RaymixSettings) -> dict[str, Any]:
    # host/port are the Serve proxy's on Kubernetes; the rest goes to build_app unchanged
    args = s.model_dump(exclude_defaults=True, exclude={"host", "port", "address"})
    return {
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {"name": "raymix", "import_path": "deployments.app:build_app", "route_prefix": "/", "args": args}
        ],
    }


def container(
    name: str, image: str, resources: dict[str, Any], ports: list[tuple[str, int]]
) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
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
    head = container(
        "ray-head",
        image,
        {"cpu": "4", "memory": "16Gi"},
        [("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000), ("metrics", 8080)],
    )
    worker = container(
        "ray-worker",
        image,
        {"cpu": str(worker_cpus), "memory": worker_memory, "nvidia.com/gpu": str(gpus_per_worker)},
        [("metrics", 8080)],
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
    """Multi-line strings (the serveConfigV2) as literal blocks, as people write them."""


_Dumper.add_representer(
    str,
    lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None),
)


def render(s: RaymixSettings, **kwargs: Any) -> str:
    return yaml.dump(rayservice(s, **kwargs), Dumper=_Dumper, sort_keys=False)
