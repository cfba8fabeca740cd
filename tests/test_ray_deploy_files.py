"""The deployment files parse and say what the code can run: the Serve config (and the
RayService's copy of it) validates against Ray Serve's own schema, its import path resolves to
the real application builder, and that builder turns the args into a Serve application."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from catcascade.serving.config import ServeConfig

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "deploy" / "ray" / "serve-config.yaml"
RAYSERVICE = REPO / "deploy" / "kubernetes" / "rayservice.yaml"
FRONTDOOR = REPO / "deploy" / "kubernetes" / "frontdoor.yaml"


def _serve_schema(data: dict):
    pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.parse_obj(data)


def _check_applications(schema) -> None:
    from ray.serve import Application

    assert [a.name for a in schema.applications] == ["catcascade"]
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module), attr)
        from catcascade.serving.engines.ray_deployments import app_builder

        assert builder is app_builder
        cfg = ServeConfig.model_validate(app.args)  # the args are a ServeConfig
        assert cfg.engine == "ray" and cfg.ray.app_name == app.name
        assert isinstance(builder(app.args), Application)


def test_serve_config_validates_and_builds():
    data = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = _serve_schema(data)
    assert str(schema.proxy_location).endswith("Disabled")
    _check_applications(schema)


def test_rayservice_manifest():
    import ray

    doc = yaml.safe_load(RAYSERVICE.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the pinned Ray the code was tested with
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1
    schema = _serve_schema(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    _check_applications(schema)
    cnn = ServeConfig.model_validate(schema.applications[0].args).ray.cnn
    assert 0 < cnn.num_gpus < 1  # replicas share a GPU


def test_frontdoor_manifest_is_headless_grpc():
    deployment, service = yaml.safe_load_all(FRONTDOOR.read_text())
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    assert service["spec"]["clusterIP"] == "None"  # DNS lists every pod: client-side round_robin
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--engine") + 1] == "ray" and "--ray-address" in args
    from catcascade.cli import build_parser

    parsed = build_parser().parse_args(args[1:])  # the args are a valid `catcascade serve` command line
    assert parsed.engine == "ray" and parsed.ray_address == "catcascade-head-svc:6379"
