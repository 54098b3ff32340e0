"""Deployment manifests (deploy/k8s, deploy/edge): they parse, and agree with each other, with the serving contract,
with `leukograph generate-repo` and with the CLI's own argument parsers. Static checks only: nothing is applied to a
cluster or started (no cluster, no GPU, no Docker here)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import yaml

from leukograph.build_engines.profiles import parse_hw
from leukograph.client import cli, contract
from leukograph.deploy import model_repository as repo
from leukograph.deploy.paths import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S, EDGE = DEPLOY / "k8s", DEPLOY / "edge"
TRITON_IMAGE = re.compile(r"^nvcr\.io/nvidia/tritonserver:(\d{2}\.\d{2}-py3)$")
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's defaults, as `leukograph serve` uses them
STAGE_NAMES = {s.name for s in contract.STAGES}


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[str, dict]:
    """Kubernetes objects under deploy/k8s by kind (one of each kind, except PersistentVolumeClaim)."""
    objects: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            if "kind" in doc and "apiVersion" in doc and doc["kind"] not in ("PersistentVolumeClaim", "Kustomization"):
                assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                objects[doc["kind"]] = doc
    return objects


def adapter_rule() -> dict:
    rules = load_all(K8S / "prometheus-adapter-values.yaml")[0]["rules"]["custom"]
    assert len(rules) == 1
    return rules[0]


def pod_spec() -> dict:
    return k8s_objects()["Deployment"]["spec"]["template"]["spec"]


def container(spec: dict, name: str, init: bool = False) -> dict:
    items = spec["initContainers" if init else "containers"]
    return next(c for c in items if c["name"] == name)


def leukograph_commands(script: str) -> list[list[str]]:
    """Every `leukograph ...` command line of a shell script, continuation lines joined, split like the shell."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [shlex.split(line.strip())[1:] for line in joined.splitlines() if line.strip().startswith("leukograph ")]


def parse_cli(argv: list[str]):
    """Parse argv with the real subcommand's parser (cli.COMMANDS), as `leukograph` would."""
    module = importlib.import_module(cli.COMMANDS[argv[0]][0])
    return module.get_args_parser().parse_args(argv[1:])


def loop_models(script: str) -> set[str]:
    match = re.search(r"for model in ([\w ]+); do", script)
    assert match, "the script copies the stages' model.onnx in a `for model in ...` loop"
    return set(match.group(1).split())


# ---- everything parses --------------------------------------------------------------------------------------------
def test_every_yaml_under_deploy_parses() -> None:
    paths = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert {p.parent for p in paths} >= {K8S, EDGE}
    for path in paths:
        docs = load_all(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path} holds no YAML mapping"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_all(K8S / "kustomization.yaml")[0]
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert set(kustomization["resources"]) == manifests


# ---- Deployment: image, probes, ports -------------------------------------------------------------------------------
def test_triton_image_is_pinned_and_matches_the_builder() -> None:
    server = container(pod_spec(), "tritonserver")
    match = TRITON_IMAGE.match(server["image"])
    assert match, f"pin an explicit nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tag, not {server['image']!r}"
    tag = match.group(1)
    dockerfile = (K8S / "builder.Dockerfile").read_text()
    assert f"ARG TRITON_TAG={tag}\n" in dockerfile, "builder.Dockerfile must build FROM the server's Triton release"
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in dockerfile
    builder = container(pod_spec(), "build-engines", init=True)
    assert builder["image"].endswith(f":{tag}"), "the builder image's tag names the Triton release it was built FROM"
    compose = load_all(EDGE / "docker-compose.yaml")[0]["services"]
    assert compose["triton-gpu"]["image"] == f"${{TRITON_IMAGE:-{server['image']}}}"
    assert compose["build-engines"]["image"] == f"${{BUILDER_IMAGE:-{builder['image']}}}"


def test_probes_hit_triton_health_endpoints() -> None:
    server = container(pod_spec(), "tritonserver")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    expected = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live",
                "startupProbe": "/v2/health/ready"}
    for probe, path in expected.items():
        get = server[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == TRITON_PORTS["http"], f"{probe} must target Triton's HTTP port"


def test_container_ports_match_the_service() -> None:
    objects = k8s_objects()
    deployment, service = objects["Deployment"], objects["Service"]
    server = container(deployment["spec"]["template"]["spec"], "tritonserver")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == TRITON_PORTS
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(service_ports) == set(TRITON_PORTS)
    for name, port in service_ports.items():
        assert port["port"] == TRITON_PORTS[name]
        target = port.get("targetPort", port["port"])
        assert ports.get(target, target) == TRITON_PORTS[name], f"service port {name} misses the container port"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items(), "the Service selects no Triton pod"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    limits = server["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == server["resources"]["requests"]["nvidia.com/gpu"] == 1


def test_metrics_are_scraped_from_the_metrics_port() -> None:
    objects = k8s_objects()
    monitor, service = objects["ServiceMonitor"], objects["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in service_ports
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == TRITON_PORTS["metrics"]


# ---- autoscaling: HPA <-> adapter rule <-> contract -----------------------------------------------------------------
def test_hpa_targets_the_deployment_on_the_adapter_metric() -> None:
    objects = k8s_objects()
    hpa, deployment = objects["HorizontalPodAutoscaler"], objects["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"], target["apiVersion"]) == (
        "Deployment", deployment["metadata"]["name"], deployment["apiVersion"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    # The queue target (microseconds) must sit well inside the product's ~50 ms p99 per-frame budget.
    assert 0 < int(metric["pods"]["target"]["averageValue"]) < 50_000
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_adapter_rule_is_queue_time_per_frame_of_this_pipeline() -> None:
    rule = adapter_rule()
    query = rule["metricsQuery"]
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_queue_duration_us")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    numerator, denominator = query.split("\n/", 1) if "\n/" in query else query.split(" / ", 1)
    assert "rate(nv_inference_queue_duration_us{<<.LabelMatchers>>" in numerator
    assert "rate(nv_inference_request_success{<<.LabelMatchers>>" in denominator
    steps = re.search(r'model=~"([^"]+)"', numerator)
    assert steps and set(steps.group(1).split("|")) == STAGE_NAMES, "queue time: sum over the ensemble's steps"
    assert f'model="{contract.PIPELINE.name}"' in denominator, "per request of the ensemble, i.e. per frame"
    assert "<<.GroupBy>>" in numerator and "<<.GroupBy>>" in denominator


# ---- model repository: the path Triton reads is the one the init container generates ---------------------------
def test_deployment_serves_the_repository_generate_repo_writes() -> None:
    spec = pod_spec()
    server, builder = container(spec, "tritonserver"), container(spec, "build-engines", init=True)
    flags = [a for a in server["args"] if a.startswith("--model-repository=")]
    assert server["command"] == ["tritonserver"] and len(flags) == 1
    served = flags[0].split("=", 1)[1]

    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    builder_mounts = {m["mountPath"]: m["name"] for m in builder["volumeMounts"]}
    assert mounts[served] == builder_mounts[served], "init container and server must share the repository volume"
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[served])
    assert "emptyDir" in volume, "plans are built per pod for its GPU, never shipped"

    script = builder["args"][0]
    commands = {argv[0]: parse_cli(argv) for argv in leukograph_commands(script)}
    assert set(commands) == {"generate-repo", "build-engines"}
    generate, build = commands["generate-repo"], commands["build-engines"]
    assert generate.backend == "tensorrt" and str(generate.model_repository) == served
    assert str(build.model_repository) == served and not build.no_verify
    frame_size = next(e["value"] for e in builder["env"] if e["name"] == "FRAME_SIZE")
    parse_hw(frame_size)  # a frame size the contract accepts
    assert builder_mounts[build.data_root] and build.precision == "fp16"

    # The stages copied in are exactly the contract's, at the path `leukograph export` writes.
    assert loop_models(script) == STAGE_NAMES
    assert f'"/source/$model/{repo.VERSION_DIR}/{repo.model_file("onnxruntime")}"' in script
    rendered = repo.render("tensorrt")
    for name in STAGE_NAMES | {contract.PIPELINE.name}:
        assert f"{name}/config.pbtxt" in rendered


# ---- edge box -------------------------------------------------------------------------------------------------------
def test_edge_compose_matches_the_cli_and_the_k8s_build() -> None:
    services = load_all(EDGE / "docker-compose.yaml")[0]["services"]
    k8s_script = container(pod_spec(), "build-engines", init=True)["args"][0]

    build_script = services["build-engines"]["command"][2].replace("$$", "$")
    assert loop_models(build_script) == loop_models(k8s_script) == STAGE_NAMES
    for argv in leukograph_commands(build_script):
        args = parse_cli(argv)
        assert str(args.model_repository) == "/models"
    assert "trt-repository:/models" in services["build-engines"]["volumes"]

    gpu = services["triton-gpu"]
    assert "--model-repository=/models" in gpu["command"] and "trt-repository:/models:ro" in gpu["volumes"]
    assert gpu["depends_on"]["build-engines"]["condition"] == "service_completed_successfully"

    cpu = services["triton-cpu"]
    serve = parse_cli(cpu["command"])
    assert serve.host == "0.0.0.0", "serve binds 127.0.0.1 by default: the client container could not reach it"
    assert (serve.http_port, serve.grpc_port, serve.metrics_port) == tuple(TRITON_PORTS.values())

    for name, server in (("client-gpu", "triton-gpu"), ("client-cpu", "triton-cpu")):
        client = services[name]
        assert client["depends_on"][server]["condition"] == "service_healthy"
        assert services[server]["networks"]["default"]["aliases"] == ["triton"]
        stream = parse_cli(client["command"])
        assert stream.url == f"triton:{TRITON_PORTS['grpc']}" and stream.protocol == "grpc"
        assert Path(stream.db).parent.as_posix() in {v.split(":")[1] for v in client["volumes"]}
    for server in ("triton-gpu", "triton-cpu"):
        published = {p.rsplit(":", 1)[1]: p for p in services[server]["ports"]}
        assert set(published) == {str(p) for p in TRITON_PORTS.values()}
        assert all(p.startswith("127.0.0.1:") for p in published.values()), "publish on localhost only"


def test_client_image_has_no_torch() -> None:
    dockerfile = (EDGE / "client.Dockerfile").read_text()
    pip_lines = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert pip_lines and not any("[" in line for line in pip_lines), "the client installs the base package only"


def test_readme_says_plainly_what_has_not_run() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "## What has run" in text and "nothing here has run on a gpu" in text.lower()
