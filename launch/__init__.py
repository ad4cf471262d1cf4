"""Launching raymix: the CLI, bring-up (start or join Ray, deploy, wait), elastic scaling and the
KubeRay manifest. The top layer: it imports the deployments, nothing imports it."""
