"""Packaging, checked offline: the Kubernetes manifests build with kustomize and validate strictly against
the Kubernetes schemas (an unknown field is an error); what ties them together holds (selectors, ports,
probes on the server's endpoints, a grace period longer than the drain, the autoscaler's metric); and the
Dockerfile passes hadolint and matches the server's defaults."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from kubernetes_validate.utils import validate

from server.cli import configs
from server.flags import parse_args
from server.healthcheck import health_url
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor",
         "PersistentVolumeClaim"}


def tool(name: str) -> str:
    """A command installed beside this Python (the test extra's wheels), else on PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


@pytest.fixture(scope="module")
def built() -> dict[str, dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "deploy")], check=True, capture_output=True,
                         text=True).stdout
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    assert len(docs) == len({doc["kind"] for doc in docs})
    return {doc["kind"]: doc for doc in docs}


def test_kustomize_builds_every_resource(built):
    assert set(built) == KINDS
    assert all(doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nanoserve" for doc in built.values())


@pytest.mark.parametrize("version", ["1.30", "1.37"])
def test_manifests_validate_strictly(built, version):
    for kind, doc in built.items():
        if kind != "ServiceMonitor":  # a CRD: no schema ships with Kubernetes; checked below
            validate(doc, version, strict=True)


def _pod(built) -> tuple[dict, dict]:
    pod = built["Deployment"]["spec"]["template"]
    return pod, pod["spec"]["containers"][0]


def test_selectors_and_names_agree(built):
    pod, container = _pod(built)
    labels = pod["metadata"]["labels"]
    assert built["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert built["Service"]["spec"]["selector"].items() <= labels.items()
    assert built["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert built["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == built["Deployment"]["metadata"]["name"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [built["PersistentVolumeClaim"]["metadata"]["name"]]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [p["targetPort"] for p in built["Service"]["spec"]["ports"]] == ["http"] and ports["http"] == 8000


def test_service_monitor_scrapes_the_service(built):
    monitor, service = built["ServiceMonitor"], built["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and set(monitor["spec"]) == {"selector", "endpoints"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


def test_the_pod_runs_the_server_as_it_expects(built):
    pod, container = _pod(built)
    _, server = configs(parse_args(container["args"]))  # the server's own parser accepts the flags
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {name: probe["path"] for name, probe in probes.items()} == {
        "startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
    assert all(probe["port"] == "http" for probe in probes.values())
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop[0] == "sleep" and grace > int(pre_stop[1]) + server.drain_timeout
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and pod["spec"]["securityContext"]["runAsNonRoot"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NANOSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "nanoserve-api-key"
    assert env["NANOSERVE_CACHE"]["value"] in {m["mountPath"] for m in container["volumeMounts"]}


def test_the_autoscaler_metric_is_one_the_server_exports(built):
    """The adapter rule turns a series the server exports into the metric the HPA asks for."""
    metric = built["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rule = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter-rules.yaml").read_text())["rules"][0]
    series = rule["seriesQuery"].split("{")[0]
    assert re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series) == metric
    metrics = Metrics()
    scheduler = SimpleNamespace(running=[], waiting=[1, 2], num_preemptions=0, prefix_cache_queries=0,
                                prefix_cache_hits=0)
    metrics.watch(SimpleNamespace(scheduler=scheduler, pool=SimpleNamespace(usage=0.0)), queued=lambda: 0)
    assert f"{series} 2.0" in metrics.render().decode()


@pytest.mark.parametrize("command_line, url", [
    (["python", "-m", "server"], "http://127.0.0.1:8000/health"),
    (["python", "-m", "server", "--max-model-len", "4096", "--port", "9000"], "http://127.0.0.1:9000/health"),
    (["/sbin/docker-init", "--", "python", "-m", "server", "--port=9001"], "http://127.0.0.1:9001/health"),  # --init
    (["python", "-m", "server", "--host", "::", "--port", "7"], "http://[::1]:7/health"),
    (["python", "-m", "server", "--host", "10.1.2.3"], "http://10.1.2.3:8000/health")])
def test_the_docker_health_check_asks_where_the_server_listens(command_line, url):
    assert health_url(command_line) == url


def test_the_docker_health_check_loads_no_engine():
    """It runs every 30 s beside the engine: importing torch would cost seconds of the server's cores each time."""
    code = "import sys, server.healthcheck as h; h.parse_args([]); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_dockerfile_lints_clean_and_matches_the_server():
    subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], check=True)
    text = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {parse_args([]).port}" in text
    assert re.search(r'HEALTHCHECK .*\n.*CMD \["python", "-m", "server.healthcheck"\]', text)
    assert 'ENTRYPOINT ["python", "-m", "server"]' in text
    assert re.search(r"^USER (?!root|0\b)", text, re.M) and "VOLUME /models" in text
