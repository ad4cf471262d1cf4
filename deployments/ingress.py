"""Ingress: the Ray Serve deployment that hosts the OpenAI API (api.app) for the router.

Thin by design: it loads the tokenizer and the generation defaults, connects to the routers
(deployments.routers: a RouterClient each, a router picked per request), and hands the API layer
its ServingContext; every HTTP behaviour lives in `api/`.
"""

from __future__ import annotations

import contextlib

from ray import serve

from api import access_log
from api.app import build_api
from api.context import ServingContext
from api.metrics import ServingMetrics
from cluster.config import RaymixSettings
from deployments.ray_metrics import RayRequestMetrics
from deployments.routers import Routers
from moe.engine.generation import generation_defaults
from moe.tokenizer import load_tokenizer


@serve.ingress()
class Ingress:
    def __init__(self, settings: RaymixSettings, routers: list[serve.handle.DeploymentHandle]):
        access_log.to_stderr()
        self.client = Routers(routers, settings.block_size)
        model_dir = settings.model_dir()
        self.context = ServingContext(
            settings=settings,
            engine=self.client,
            tokenizer=load_tokenizer(model_dir, settings.tokenizer_mode),
            defaults=generation_defaults(
                model_dir, settings.generation_config, settings.override_generation_config
            ),
            metrics=ServingMetrics(mirror=RayRequestMetrics(), expert_metrics=settings.expert_metrics),
        )

    def __serve_build_asgi_app__(self):
        return build_api(self.context, behind_serve_proxy=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
