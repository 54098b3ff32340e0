"""Deployment (deploy/k8s, deploy/k3s, deploy/edge, build_engines/gpu_deploy.sh), checked with real validators:

* every Kubernetes manifest against the Kubernetes schema (`kubernetes-validate`, strict), raw and as `kubectl
  kustomize` renders the base and the k3s overlay;
* every Dockerfile with `hadolint`;
* the whole deploy/ tree with `checkov`: no failed check, and every suppression names its reason in the file;
* the manifests agree with each other, with the serving contract, with `leukograph generate-repo` and with the CLI's
  own argument parsers; the builder context holds what build-engines verification reads; the load check starts a
  real tritonserver; the adapter's metric exists on a real server.
Nothing is applied to a cluster or started in Docker (there is neither here). A validator that is not installed
skips its test with its name (pip install -e '.[dev]' installs all of them).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from leukograph.build_engines.profiles import parse_hw
from leukograph.client import cli, contract
from leukograph.deploy import builder_context
from leukograph.deploy import model_repository as repo
from leukograph.deploy.paths import MODEL_REPOSITORY, REPO_ROOT, data_root

DEPLOY = REPO_ROOT / "deploy"
K8S, K3S, EDGE = DEPLOY / "k8s", DEPLOY / "k3s", DEPLOY / "edge"
BIN = Path(sys.executable).parent
TRITON_IMAGE = re.compile(r"^nvcr\.io/nvidia/tritonserver:(\d{2}\.\d{2}-py3)$")
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's defaults, as `leukograph serve` uses them
STAGE_NAMES = {s.name for s in contract.SERVED_STAGES}  # every step of the served repository
# The shared restricted-API convention (same categories, header and variable as `leukograph serve`).
RESTRICTED = "shared-memory,model-config,model-repository,logging,trace"
ADMIN_HEADER, ADMIN_ENV = "leukograph-admin-key", "LEUKOGRAPH_ADMIN_KEY"
NO_SCHEMA_KINDS = {"ServiceMonitor"}  # a CRD (monitoring.coreos.com): kubernetes-validate ships no schema for it
KUBERNETES_VERSION = "1.30.0"  # oldest version checked; the latest one the validator ships is checked too
CLIENT_NAMESPACE, MONITORING_NAMESPACE = "leukograph-clients", "monitoring"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under deploy/k8s (not the kustomization, not the Helm values)."""
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)
            if "kind" in doc and "apiVersion" in doc and doc["kind"] != "Kustomization"]


def k8s_objects() -> dict[str, dict]:
    objects: dict[str, dict] = {}
    for _, doc in manifests():
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


def compose() -> dict:
    return load_all(EDGE / "docker-compose.yaml")[0]["services"]


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


def tool(name: str) -> str:
    """The validator's executable (this environment's bin first), or skip naming it."""
    path = shutil.which(name, path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return path


def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# ---- real validators ----------------------------------------------------------------------------------------------
def _validate(doc: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for version in (KUBERNETES_VERSION, kubernetes_validate.latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_manifest_passes_the_kubernetes_schema() -> None:
    checked = set()
    for _, doc in manifests():
        if doc["kind"] in NO_SCHEMA_KINDS:
            continue
        _validate(doc)
        checked.add(doc["kind"])
    assert checked == {"Namespace", "Deployment", "Service", "NetworkPolicy", "HorizontalPodAutoscaler"}


def test_the_validator_rejects_a_broken_manifest() -> None:
    """The schema check is live: a misspelt field and a wrong type fail strict validation."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    deployment = json.loads(json.dumps(k8s_objects()["Deployment"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = json.loads(json.dumps(k8s_objects()["Deployment"]))
    deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = "1000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("directory", [K8S, K3S], ids=["base", "k3s"])
def test_kustomize_renders_valid_objects(directory: Path) -> None:
    rendered = kustomize(directory)
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds == sorted(doc["kind"] for _, doc in manifests())
    for doc in rendered:
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "leukograph"
        if doc["kind"] not in NO_SCHEMA_KINDS:
            _validate(doc)
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert (spec.get("runtimeClassName") == "nvidia") == (directory == K3S)
    builder = container(spec, "build-engines", init=True)["image"]
    assert not builder.startswith("leukograph/"), "kustomization.yaml maps the builder image to a registry"


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = tool("hadolint")
    dockerfiles = sorted(DEPLOY.rglob("*Dockerfile"))
    assert {p.name for p in dockerfiles} == {"builder.Dockerfile", "client.Dockerfile", "cpu-server.Dockerfile"}
    for path in dockerfiles:
        result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"
        for line in path.read_text().splitlines():  # a suppression says why on the line above
            if "hadolint ignore" in line:
                above = path.read_text().splitlines()
                index = above.index(line)
                assert index > 0 and above[index - 1].startswith("#"), f"{path.name}: unexplained '{line}'"


@pytest.mark.slow
def test_checkov_finds_no_failed_check_and_every_skip_has_a_reason(tmp_path: Path) -> None:
    checkov = tool("checkov")
    env = dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))  # kubectl for kustomize
    result = subprocess.run([checkov, "-d", str(DEPLOY), "--skip-download", "--quiet", "--compact", "-o", "json"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    types = {r["check_type"] for r in reports}
    assert {"kubernetes", "dockerfile"} <= types, types
    failed = [(r["check_type"], f["check_id"], f["file_path"]) for r in reports for f in r["results"]["failed_checks"]]
    assert failed == [], failed
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(r["summary"]["passed"] for r in reports) > 100
    # Every suppression carries its reason: `checkov.io/skipN: CKV_X=reason`.
    annotations = k8s_objects()["Deployment"]["metadata"]["annotations"]
    skips = {k: v for k, v in annotations.items() if k.startswith("checkov.io/skip")}
    assert skips
    for value in skips.values():
        check_id, _, reason = value.partition("=")
        assert re.fullmatch(r"CKV2?_K8S_\d+", check_id) and len(reason.split()) >= 8, value


# ---- Deployment: image, probes, ports, security ----------------------------------------------------------------
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
    services = compose()
    assert services["triton-gpu"]["image"] == f"${{TRITON_IMAGE:-{server['image']}}}"
    assert services["build-engines"]["build"]["args"]["TRITON_TAG"] == f"${{TRITON_TAG:-{tag}}}"


def test_builder_uses_the_images_own_tensorrt() -> None:
    """No `tensorrt` wheel with its own libnvinfer: the bindings of the image's libnvinfer version, checked."""
    dockerfile = (K8S / "builder.Dockerfile").read_text()
    assert re.search(r"libnvinfer\.so\.\*\.\*\.\*", dockerfile), "the image's libnvinfer version is read"
    assert '"tensorrt-cu${cuda_major}-bindings==${trt_version}.*"' in dockerfile and "--no-deps" in dockerfile
    assert "/proc/self/maps" in dockerfile, "the build checks which libnvinfer the bindings load"
    assert not re.search(r'"tensorrt==', dockerfile)


def test_probes_hit_triton_health_endpoints() -> None:
    server = container(pod_spec(), "tritonserver")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    expected = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live",
                "startupProbe": "/v2/health/ready"}
    for probe, path in expected.items():
        get = server[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == TRITON_PORTS["http"], f"{probe} must target Triton's HTTP port"


def test_pods_run_restricted() -> None:
    spec = pod_spec()
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == pod["fsGroup"] == 1000
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert all("emptyDir" in v for v in volumes.values()), "no volume has to be filled before the first apply"
    for item in spec["initContainers"] + spec["containers"]:
        context = item["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
        mounts = {m["mountPath"]: m["name"] for m in item["volumeMounts"]}
        assert mounts["/tmp"] == "tmp" and "emptyDir" in volumes["tmp"]
    namespace = k8s_objects()["Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_admin_apis_need_the_key_from_a_secret() -> None:
    server = container(pod_spec(), "tritonserver")
    env = {e["name"]: e for e in server["env"]}
    assert env[ADMIN_ENV]["valueFrom"]["secretKeyRef"] == {"name": "leukograph-admin-key", "key": "key"}
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
        assert f"{flag}={RESTRICTED}:{ADMIN_HEADER}=$({ADMIN_ENV})" in server["args"]
    gpu = compose()["triton-gpu"]["command"]
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
        [arg] = [a for a in gpu if a.startswith(flag)]
        assert arg.startswith(f"{flag}={RESTRICTED}:{ADMIN_HEADER}=${{{ADMIN_ENV}:?")


def test_restricted_api_flags_work_on_a_real_server(served_repository: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The Deployment's own flags, key substituted as Kubernetes does: inference stays open, the model config needs
    the key (gRPC: header `triton-grpc-protocol-<key name>`, Triton's prefix; HTTP: `<key name>`); the pipeline
    client sends it when LEUKOGRAPH_ADMIN_KEY is set, as the edge box's client container has it."""
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client
    from tritonclient.utils import InferenceServerException

    from leukograph.client.triton_client import AccessDenied, TritonPipelineClient
    from leukograph.deploy.server import TritonServer, free_port

    key = "k" * 32
    args = tuple(a.replace(f"$({ADMIN_ENV})", key) for a in container(pod_spec(), "tritonserver")["args"]
                 if "restricted" in a)
    assert len(args) == 2
    server = TritonServer(served_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_path=tmp_path / "tritonserver.log", extra_args=args)
    try:
        server.start(120)
        grpc = grpc_client.InferenceServerClient(server.grpc_url)
        http = http_client.InferenceServerClient(server.http_url)
        assert grpc.is_model_ready(contract.PIPELINE.name) and http.is_server_ready()
        for call in (lambda: grpc.get_model_config(contract.PIPELINE.name),
                     lambda: http.get_model_config(contract.PIPELINE.name),
                     lambda: grpc.get_model_repository_index()):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        grpc.get_model_config(contract.PIPELINE.name, headers={f"triton-grpc-protocol-{ADMIN_HEADER}": key})
        http.get_model_config(contract.PIPELINE.name, headers={ADMIN_HEADER: key})
        monkeypatch.delenv(ADMIN_ENV, raising=False)
        with TritonPipelineClient(server.grpc_url) as client, pytest.raises(AccessDenied, match="restricted"):
            client.fetch_weights_id()
        monkeypatch.setenv(ADMIN_ENV, key)
        frame = np.zeros((64, 64, 3), np.uint8)
        boxes = np.array([[8, 8, 40, 40]], np.float32)
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            with TritonPipelineClient(url, protocol, shm=True) as client:  # shm registration: restricted too
                assert client.fetch_weights_id().startswith(contract.PIPELINE.name)
                probs, _ = client.infer(frame, boxes)
                assert probs.shape == (1, contract.NUM_CLASSES)
    finally:
        server.stop()


def test_network_policy_admits_grpc_from_clients_and_metrics_from_monitoring() -> None:
    objects = k8s_objects()
    policy, deployment = objects["NetworkPolicy"], objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["egress"] == []
    named_ports = {p["name"] for p in container(pod_spec(), "tritonserver")["ports"]}
    admitted = {}
    for rule in policy["spec"]["ingress"]:
        [source] = rule["from"]
        namespace = source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        ports = [p["port"] for p in rule["ports"]]
        assert set(ports) <= named_ports
        admitted[namespace] = ports
    assert admitted == {CLIENT_NAMESPACE: ["grpc"], MONITORING_NAMESPACE: ["metrics"]}


def test_service_is_headless_and_matches_the_pods() -> None:
    objects = k8s_objects()
    deployment, service = objects["Deployment"], objects["Service"]
    assert service["spec"]["clusterIP"] == "None", "headless: DNS lists every ready pod for client round robin"
    assert service["spec"].get("publishNotReadyAddresses", False) is False
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
    # The DNS name the README gives the client resolves to this Service.
    readme = (DEPLOY / "README.md").read_text()
    assert f"dns:///{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:8001" in readme


def test_rollout_needs_no_spare_gpu() -> None:
    """maxSurge 0: a rollout replaces pods in place, so a cluster whose GPUs are all held by the pods can finish it."""
    deployment = k8s_objects()["Deployment"]
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 0, "maxUnavailable": 1}
    assert deployment["spec"]["progressDeadlineSeconds"] >= 1200, "image pull + plan build take minutes"
    hpa = k8s_objects()["HorizontalPodAutoscaler"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] <= 2, "sized for a 2-GPU lab cluster"


def test_metrics_are_scraped_from_the_metrics_port() -> None:
    objects = k8s_objects()
    monitor, service = objects["ServiceMonitor"], objects["Service"]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == TRITON_PORTS["metrics"]


# ---- autoscaling: HPA <-> adapter rule <-> contract <-> a real server ----------------------------------------
def test_hpa_scales_on_pending_requests_of_both_steps() -> None:
    objects = k8s_objects()
    hpa, deployment = objects["HorizontalPodAutoscaler"], objects["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"], target["apiVersion"]) == (
        "Deployment", deployment["metadata"]["name"], deployment["apiVersion"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300

    rule = adapter_rule()
    query = rule["metricsQuery"]
    assert rule["seriesQuery"].startswith("nv_inference_pending_request_count{")
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_pending_request_count")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "nv_inference_pending_request_count{<<.LabelMatchers>>" in query and "<<.GroupBy>>" in query
    steps = re.search(r'model=~"([^"]+)"', query)
    assert steps and set(steps.group(1).split("|")) == STAGE_NAMES, "pending requests summed over every step"
    assert "/" not in query.replace("<<.", ""), "no ratio: nothing can divide by zero when every request fails"


def test_the_adapter_metric_exists_on_a_real_server(triton_server) -> None:
    """The gauge the HPA scales on is what tritonserver exports, per step model."""
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    models = set(re.findall(r'^nv_inference_pending_request_count\{[^}]*model="([^"]+)"', text, re.M))
    assert models >= STAGE_NAMES, models


# ---- the builder: what it copies, builds, verifies and loads --------------------------------------------------
def test_init_container_builds_verifies_and_loads_the_plans() -> None:
    spec = pod_spec()
    server, builder = container(spec, "tritonserver"), container(spec, "build-engines", init=True)
    flags = [a for a in server["args"] if a.startswith("--model-repository=")]
    assert server["command"] == ["tritonserver"] and len(flags) == 1
    served = flags[0].split("=", 1)[1]
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    builder_mounts = {m["mountPath"]: m["name"] for m in builder["volumeMounts"]}
    assert mounts[served] == builder_mounts[served], "init container and server must share the repository volume"

    script = builder["args"][0]
    commands = {argv[0]: parse_cli(argv) for argv in leukograph_commands(script)}
    assert set(commands) == {"generate-repo", "build-engines"}
    generate, build = commands["generate-repo"], commands["build-engines"]
    assert generate.backend == "tensorrt" and str(generate.model_repository) == served
    assert str(build.model_repository) == served and not build.no_verify and build.precision == "fp16"
    assert build.data_root == "/opt/leukograph/verification-data", "the subset baked into the builder image"
    parse_hw(next(e["value"] for e in builder["env"] if e["name"] == "FRAME_SIZE"))
    load = re.search(r"python3 -m leukograph\.deploy\.load_check (.+)", script)
    assert load and script.rstrip().endswith(load.group(0)), "the plans are loaded last, after verification"
    from leukograph.deploy import load_check

    assert str(load_check.get_args_parser().parse_args(shlex.split(load.group(1))).model_repository) == served

    assert loop_models(script) == STAGE_NAMES
    assert f'"/opt/leukograph/model_source/$model/{repo.VERSION_DIR}/{repo.model_file("onnxruntime")}"' in script
    dockerfile = (K8S / "builder.Dockerfile").read_text()
    assert "COPY model_source/ /opt/leukograph/model_source/" in dockerfile
    assert "COPY verification-data/ /opt/leukograph/verification-data/" in dockerfile
    rendered = repo.render("tensorrt")
    for name in STAGE_NAMES | {p.name for p in contract.PIPELINES}:
        assert f"{name}/config.pbtxt" in rendered


@pytest.mark.slow
def test_builder_context_holds_the_wheel_onnx_and_what_verification_reads(served_repository: Path,
                                                                          tmp_path: Path) -> None:
    """The verification subset gives build-engines exactly the samples the full datasets give."""
    from leukograph.build_engines.verify import held_out_samples
    from leukograph.training.datasets import split_frames

    out = tmp_path / "context"
    args = builder_context.get_args_parser().parse_args([str(out), "--model-repository", str(served_repository)])
    assert builder_context.main(args) == 0
    assert [p.name for p in (out / "dist").iterdir()][0].startswith("leukograph-")
    for stage in STAGE_NAMES:
        assert (out / "model_source" / stage / "1" / "model.onnx").read_bytes() == \
            (served_repository / stage / "1" / "model.onnx").read_bytes()
    subset = out / "verification-data"
    full_samples = held_out_samples("voc", root=data_root())
    subset_samples = held_out_samples("voc", root=subset)
    assert [s.frame_id for s in subset_samples] == [s.frame_id for s in full_samples] and len(full_samples) > 50
    for mine, theirs in zip(subset_samples, full_samples):
        assert mine.labels == theirs.labels and (mine.boxes == theirs.boxes).all()
        assert (mine.frame == theirs.frame).all()
    assert split_frames(subset).held_out == split_frames(data_root()).held_out
    size = sum(p.stat().st_size for p in subset.rglob("*") if p.is_file())
    assert size < 60e6, f"the verification subset is {size / 1e6:.0f} MB"
    # Every COPY source of the three Dockerfiles is in the context.
    for dockerfile in sorted(DEPLOY.rglob("*Dockerfile")):
        for source in re.findall(r"^COPY\s+(\S+)\s", dockerfile.read_text(), re.M):
            assert (out / source).exists(), f"{dockerfile.name}: COPY {source} is not in the build context"
    with pytest.raises(builder_context.UserError, match="not empty"):
        builder_context.main(args)


def test_load_check_loads_a_repository_in_a_real_server(served_repository: Path, tmp_path: Path) -> None:
    """As the init container runs it (`--tritonserver`: a binary with its own backends, here the CPU server behind a
    wrapper that adds the bundled backend folder), then a repository that cannot load."""
    from leukograph.deploy.server import TritonServer

    bundled, env = TritonServer(served_repository).command()
    wrapper = tmp_path / "tritonserver"
    wrapper.write_text(f"#!/bin/sh\nexport LD_LIBRARY_PATH={shlex.quote(env['LD_LIBRARY_PATH'])}\n"
                       f"export PATH={shlex.quote(env['PATH'])}\n"
                       f"exec {shlex.quote(bundled[0])} {shlex.quote(bundled[2])} \"$@\"\n")
    wrapper.chmod(0o755)
    assert bundled[2].startswith("--backend-directory=")
    ok = subprocess.run([sys.executable, "-m", "leukograph.deploy.load_check", "--tritonserver", str(wrapper),
                         "--model-repository", str(served_repository), "--timeout", "120"],
                        capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"load check: every model in {served_repository} loaded and ready in ")
    cmd = [sys.executable, "-m", "leukograph.deploy.load_check", "--bundled", "--timeout", "120"]
    broken = tmp_path / "broken"  # configs without model.onnx: the python steps fail to load
    repo.generate(broken, "onnxruntime")
    bad = subprocess.run([*cmd, "--model-repository", str(broken)], capture_output=True, text=True, timeout=180,
                         env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    [line] = bad.stderr.strip().splitlines()
    assert line.startswith(f"load check: error: {len(contract.SERVED_STAGES)} model(s) failed to load (log "), line
    assert all(f"{stage.name}: " in line for stage in contract.SERVED_STAGES) and "model.onnx" in line
    missing = subprocess.run([sys.executable, "-m", "leukograph.deploy.load_check", "--model-repository",
                              str(served_repository), "--tritonserver", "no-such-tritonserver"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0


# ---- edge box -------------------------------------------------------------------------------------------------------
def test_edge_compose_up_starts_the_server_only() -> None:
    services = compose()
    k8s_script = container(pod_spec(), "build-engines", init=True)["args"][0]
    for name, service in services.items():
        assert "build" in service or TRITON_IMAGE.match(service["image"].split(":-", 1)[-1].rstrip("}")), \
            f"{name}: a build: or a real image"
        if "build" in service:
            assert service["pull_policy"] == "build", f"{name}: never pulled from a registry by its local name"
            dockerfile = (EDGE / service["build"]["context"] / service["build"]["dockerfile"]).resolve()
            assert dockerfile.is_file() and dockerfile.is_relative_to(DEPLOY), dockerfile
            assert (EDGE / service["build"]["context"]).resolve() == REPO_ROOT / "build" / "builder-context"
        assert "devices" not in service, f"{name}: no device in the base file (camera.yaml adds it to the client)"
        for volume in service.get("volumes", []):
            assert not volume.startswith((".", "/", "$")), f"{name}: host path {volume}; images carry their data"
    assert services["client"]["profiles"] == ["client"], "`up` never starts a streaming client"
    assert all("client" not in s["profiles"] for n, s in services.items() if n != "client")
    camera = load_all(EDGE / "camera.yaml")[0]["services"]
    assert set(camera) == {"client"} and camera["client"]["devices"][0].endswith(":/dev/video0")

    build_script = services["build-engines"]["command"][2].replace("$$", "$")
    assert loop_models(build_script) == loop_models(k8s_script) == STAGE_NAMES
    assert leukograph_commands(build_script) == leukograph_commands(k8s_script.replace('"$FRAME_SIZE"',
                                                                                       '"${FRAME_SIZE}"'))
    assert "trt-repository:/models" in services["build-engines"]["volumes"]

    gpu = services["triton-gpu"]
    assert "--model-repository=/models" in gpu["command"] and "trt-repository:/models:ro" in gpu["volumes"]
    assert gpu["depends_on"]["build-engines"]["condition"] == "service_completed_successfully"
    assert gpu["user"] == "1000:1000"

    cpu = services["triton-cpu"]
    serve = parse_cli(cpu["command"])
    assert serve.host == "0.0.0.0", "serve binds 127.0.0.1 by default: the client container could not reach it"
    assert (serve.http_port, serve.grpc_port, serve.metrics_port) == tuple(TRITON_PORTS.values())
    assert "model_repository" in (DEPLOY / "edge" / "cpu-server.Dockerfile").read_text()

    for server in ("triton-gpu", "triton-cpu"):
        assert services[server]["networks"]["default"]["aliases"] == ["triton"]
        published = {p.rsplit(":", 1)[1]: p for p in services[server]["ports"]}
        assert set(published) == {str(p) for p in TRITON_PORTS.values()}
        assert all(p.startswith("127.0.0.1:") for p in published.values()), "publish on localhost only"
    for name in ("build-engines", "triton-gpu", "client"):
        assert services[name]["cap_drop"] == ["ALL"] and services[name]["read_only"] is True


def test_client_image_has_no_torch_and_runs_unprivileged() -> None:
    dockerfile = (EDGE / "client.Dockerfile").read_text()
    pip_lines = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert pip_lines and not any("[" in line for line in pip_lines), "the client installs the base package only"
    assert "USER 1000:1000" in dockerfile and "--groups video" in dockerfile


def test_readme_commands_match_the_files() -> None:
    text = (DEPLOY / "README.md").read_text()
    flowing = " ".join(text.lower().split())
    assert "## What has run" in text and "none of these deployment paths has run on a gpu" in flowing
    for command in ("kubectl apply -k deploy/k8s", "kubectl apply -k deploy/k3s",
                    "python -m leukograph.deploy.builder_context build/builder-context",
                    "-f deploy/k8s/prometheus-adapter-values.yaml", "docker compose --profile gpu up -d",
                    "docker compose --profile cpu up -d", "-f camera.yaml run --rm client stream 0",
                    f"kubectl create namespace {CLIENT_NAMESPACE}", "create secret generic leukograph-admin-key"):
        assert command in text, command


# ---- gpu_deploy.sh ------------------------------------------------------------------------------------------------
def test_gpu_deploy_never_writes_the_committed_repository(tmp_path: Path) -> None:
    script = REPO_ROOT / "build_engines" / "gpu_deploy.sh"
    text = script.read_text()
    assert '--model-repository "$TRT_REPOSITORY"' in text and '--model-repository "$REPO"' not in text
    assert "--http-address 127.0.0.1 --grpc-address 127.0.0.1 --metrics-address 127.0.0.1" in text
    assert "import torch" in text and "import tensorrt" in text and "import pycuda.driver" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    before = sorted((p.relative_to(MODEL_REPOSITORY), p.stat().st_mtime_ns) for p in MODEL_REPOSITORY.rglob("*"))
    env = dict(os.environ, TRT_REPOSITORY=str(MODEL_REPOSITORY), PATH=os.environ.get("PATH", ""))
    refused = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("gpu_deploy: TRT_REPOSITORY must not be the committed model_repository/ "
                                      "(it holds the CPU configs)")
    env = dict(os.environ, TRT_REPOSITORY=str(tmp_path / "gpu_repo"), LEUKOGRAPH=str(BIN / "leukograph"),
               TRITONSERVER="no-such-tritonserver")
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 1 and "'no-such-tritonserver' not found" in missing.stderr
    after = sorted((p.relative_to(MODEL_REPOSITORY), p.stat().st_mtime_ns) for p in MODEL_REPOSITORY.rglob("*"))
    assert after == before


def test_gpu_deploy_exports_again_what_serve_would(tmp_path: Path, tiny_graph: Callable) -> None:
    """gpu_deploy.sh asks `leukograph serve`'s own rule (`onnx_stale`) whether to export: missing graphs, and graphs
    exported by other code than this checkout's (an upgrade), are exported before the engines are built."""
    script = (REPO_ROOT / "build_engines" / "gpu_deploy.sh").read_text()
    function = re.search(r"^export_reason\(\) \{\n.*?^\}\n", script, re.S | re.M)
    assert function is not None and 'if [[ -n "$stale" ]]; then' in script

    def reason(source: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", function.group(0) + 'export_reason "$1"', "-", str(source)],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))

    source = tmp_path / "source"
    repo.generate(source, "onnxruntime")
    missing = reason(source)
    assert missing.returncode == 0 and missing.stdout.strip().endswith("model.onnx is missing")
    from leukograph.deploy.paths import graph_code_digest

    for stage in contract.SERVED_STAGES:
        tiny_graph(source / stage.name / "1" / "model.onnx", graph_code_digest())
    newest = max(path.stat().st_mtime for path in (REPO_ROOT / "training" / "weights").glob("*.pt"))
    for stage in contract.SERVED_STAGES:  # newer than the weights, as an export after them is
        os.utime(source / stage.name / "1" / "model.onnx", (newest + 60, newest + 60))
    assert reason(source).stdout.strip() == ""
    tiny_graph(source / "cell_graph" / "1" / "model.onnx", "0123456789abcdef")
    assert "exported by other code" in reason(source).stdout
