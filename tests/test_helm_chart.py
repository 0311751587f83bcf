"""The Helm chart, rendered by the real Helm engine and checked offline.

No API server exists here, so every scenario is rendered with ``helm_python``
(Helm's Go SDK), linted in strict mode, and each object is validated against
the Kubernetes OpenAPI schemas (``kubernetes_validate``, strict, 1.29 and
1.33) or, for RayCluster/RayJob, against the KubeRay CRD schemas copied into
``tests/data/kuberay-crds``.

Other test modules may import :func:`render_chart`, :func:`find` and
:func:`prepare_entrypoint`, e.g. to submit the prepare entrypoint to a local
Ray head.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[1]
CHART_DIR = REPO / "helm" / "openimages-od"
CRD_DIR = Path(__file__).resolve().parent / "data" / "kuberay-crds"
SHARED_CRD_DIR = REPO.parent / "shared" / "reference" / "kuberay-crds"
K8S_DIR = REPO / "k8s"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
RELEASE = "oiod"
NAMESPACE = "ml"
CONFIG_PATH = "/etc/oiod/config.yaml"

# Scenario name -> values file (None = chart defaults).
SCENARIOS: dict[str, Path | None] = {"chart-defaults": None}
SCENARIOS.update({f"ci/{p.name}": p for p in sorted((CHART_DIR / "ci").glob("*-values.yaml"))})
SCENARIOS.update({f"k8s/{p.name}": p for p in sorted(K8S_DIR.glob("values-*.yaml"))})


# --------------------------------------------------------------------------- helpers others may import


@functools.lru_cache(maxsize=1)
def _chart() -> Any:
    return helm.Chart.load(str(CHART_DIR))


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def render_chart(
    values_overrides: dict | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict]:
    """Render the chart like ``helm install --dry-run`` and return its objects.

    Args:
        values_overrides: user values layered over the chart's ``values.yaml``.
        release: release name.
        namespace: release namespace.

    Returns:
        Every rendered Kubernetes object (NOTES.txt excluded), in template order.

    Raises:
        helm_python.HelmValuesError: the values break ``values.schema.json``.
        helm_python.HelmRenderError: a template ``fail``-ed (cross-field rules).
    """
    out = _chart().render(values_overrides or {}, name=release, namespace=namespace, is_install=True)
    objs: list[dict] = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        objs.extend(_docs(out[path]))
    return objs


def render_notes(values_overrides: dict | None = None) -> str:
    """The rendered NOTES.txt."""
    out = _chart().render(values_overrides or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def find(objs: list[dict], kind: str, name_suffix: str = "") -> list[dict]:
    """Objects of ``kind`` whose name ends with ``name_suffix``."""
    return [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]


def prepare_entrypoint(values_overrides: dict | None = None) -> str:
    """The exact shell command the chart's prepare RayJob runs on the Ray head."""
    (job,) = find(render_chart(values_overrides), "RayJob")
    return job["spec"]["entrypoint"]


def scenario_values(name: str) -> dict:
    path = SCENARIOS[name]
    return yaml.safe_load(path.read_text()) or {} if path else {}


# --------------------------------------------------------------------------- validation machinery


def _strict(schema: Any) -> Any:
    """Forbid unknown fields the way the API server's strict field validation does.

    Structural CRD schemas prune unknown fields silently; a test should instead
    fail on them, so every object schema that lists its properties (and does not
    preserve unknown fields) gets ``additionalProperties: false``.
    """
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(kind: str) -> Any:
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            schema = _strict(version["schema"]["openAPIV3Schema"])
            # metadata is validated by the API server, not the CRD schema.
            schema["properties"]["metadata"] = {"type": "object"}
            return jsonschema.Draft7Validator(schema)
    raise LookupError(f"no CRD for {kind} in {CRD_DIR}")


def validate_object(obj: dict) -> None:
    """Validate one object: KubeRay CRD schema, or Kubernetes schemas of every KUBE_VERSIONS."""
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["apiVersion"].startswith("ray.io/"):
        assert obj["apiVersion"] == "ray.io/v1", where
        errors = sorted(_crd_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, (
            where + ":\n" + "\n".join(f"  {'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])
        )
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{where} invalid for Kubernetes {version}: {path}: {exc.message}")


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """Every pod spec an object creates, labelled for messages."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    spec = obj.get("spec", {})
    if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        yield f"{kind}/{name}", spec["template"]["spec"]
    elif kind == "RayCluster":
        yield from _ray_cluster_pods(f"{kind}/{name}", spec)
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            yield from _ray_cluster_pods(f"{kind}/{name}", spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            yield f"{kind}/{name}/submitter", spec["submitterPodTemplate"]["spec"]


def _ray_cluster_pods(label: str, spec: dict) -> Iterator[tuple[str, dict]]:
    yield f"{label}/head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{label}/{group['groupName']}", group["template"]["spec"]


def container_env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --------------------------------------------------------------------------- scenarios render, lint and validate


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[str, dict, list[dict]]:
    values = scenario_values(request.param)
    return request.param, values, render_chart(values)


def test_scenarios_cover_the_required_cases() -> None:
    names = set(SCENARIOS)
    for required in ("defaults", "gpu-multiworker", "autoscaling", "external-s3"):
        assert f"ci/{required}-values.yaml" in names
    assert {"k8s/values-gke-gpu.yaml", "k8s/values-eks-gpu.yaml"} <= names


def test_lint_strict_is_clean(scenario: tuple[str, dict, list[dict]]) -> None:
    name, values, _ = scenario
    for version in KUBE_VERSIONS:
        report = helm.lint(
            str(CHART_DIR), values, strict=True, kube_version=f"v{version}", namespace=NAMESPACE
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, (name, version, report)


def test_every_object_validates(scenario: tuple[str, dict, list[dict]]) -> None:
    name, _, objs = scenario
    assert objs, name
    for obj in objs:
        validate_object(obj)


def test_every_pod_is_locked_down(scenario: tuple[str, dict, list[dict]]) -> None:
    name, _, objs = scenario
    seen = 0
    for obj in objs:
        for label, pod in pod_specs(obj):
            seen += 1
            psc = pod["securityContext"]
            assert psc["runAsNonRoot"] is True, label
            assert isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0, label
            assert isinstance(psc["fsGroup"], int), label
            assert psc["seccompProfile"]["type"] == "RuntimeDefault", label
            mounts_by_volume = {v["name"]: v for v in pod["volumes"]}
            for c in pod["containers"]:
                sc = c["securityContext"]
                where = f"{label}/{c['name']}"
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
                assert c["resources"].get("requests") and c["resources"].get("limits"), where
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert "/tmp" in mounts and "emptyDir" in mounts_by_volume[mounts["/tmp"]], where
                assert "/home/oiod" in mounts, f"{where}: caches (~/.cache, ~/.keras) need a writable home"
    assert seen, name


def test_object_names_fit_kubernetes_limits() -> None:
    long_release = "a-rather-long-release-name-for-openimages-detector-x"  # 52 chars, under Helm's 53
    values = scenario_values("ci/gpu-multiworker-values.yaml")
    values = {**values, "rayCluster": {"enabled": True}, "prepare": {"enabled": True}}
    objs = render_chart(values, release=long_release)
    for obj in objs:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"]), obj["metadata"][
            "name"
        ]
        for key, val in obj["metadata"].get("labels", {}).items():
            assert len(val) <= 63, (key, val)
    (rayjob,) = find(objs, "RayJob")
    assert len(rayjob["metadata"]["name"]) <= 47  # KubeRay's limit
    (job,) = [j for j in find(objs, "Job") if j["spec"].get("completionMode") == "Indexed"]
    workers = job["spec"]["completions"]
    assert len(f"{job['metadata']['name']}-{workers - 1}") <= 63  # pod hostname


# --------------------------------------------------------------------------- config


def test_configmap_is_the_project_config() -> None:
    values = {"config": {"train": {"steps": 123, "model_dir": "/models/m"}}}
    (cm,) = find(render_chart(values), "ConfigMap", "-config")
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    merged = copy.deepcopy(_chart().values["config"])
    merged["train"].update(values["config"]["train"])
    assert cfg == merged
    assert set(cfg) <= {
        "source",
        "selection",
        "output",
        "ray",
        "image",
        "shards",
        "train",
        "evaluate",
        "export",
        "serve",
    }
    assert cfg["ray"]["address"] == "auto"


def test_default_config_is_small() -> None:
    allowed = {
        "output": {"url", "s3"},
        "ray": {"address", "num_cpus_per_actor", "concurrency_per_actor", "forward_env"},
        "train": {"model_dir", "batch_size", "steps", "backbone"},
        "export": {"dir"},
        "serve": {"model"},
    }
    cfg = _chart().values["config"]
    for section, keys in cfg.items():
        assert section in allowed and set(keys) <= allowed[section], section
    assert set(cfg["output"]["s3"]) <= {"endpoint_url", "region"}


def _plain_env(objs: list[dict]) -> dict[str, str]:
    """Literal env of the pods (secret references get dummy values)."""
    env: dict[str, str] = {}
    for obj in objs:
        for _, pod in pod_specs(obj):
            for c in pod["containers"]:
                for e in c.get("env", []):
                    env[e["name"]] = e["value"] if "value" in e else "dummy"
    return env


def test_rendered_config_loads_with_the_project_loader(
    scenario: tuple[str, dict, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_mod = pytest.importorskip("openimages_od.config")
    name, _, objs = scenario
    (cm,) = find(objs, "ConfigMap", "-config")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    for var in ("OIOD_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    for key, val in _plain_env(objs).items():
        monkeypatch.setenv(key, val)
    cfg = config_mod.load_config(path, overrides=[])
    assert cfg.ray.address == "auto", name
    endpoint = _plain_env(objs).get("OIOD_S3_ENDPOINT")
    assert cfg.output.s3.endpoint_url == endpoint, name


def test_rendered_commands_parse_with_the_cli(scenario: tuple[str, dict, list[dict]]) -> None:
    cli = pytest.importorskip("openimages_od.cli")
    parser = cli.build_parser()
    name, _, objs = scenario
    commands = [shlex.split(o["spec"]["entrypoint"]) for o in find(objs, "RayJob")]
    for obj in objs:
        for _, pod in pod_specs(obj):
            commands += [c["command"] for c in pod["containers"] if c.get("command", [""])[0] == "oiod"]
    assert commands or name == "none"
    for argv in commands:
        args = parser.parse_args(argv[1:])
        assert args.config == CONFIG_PATH, argv


# --------------------------------------------------------------------------- bad values are refused with a clear message


@pytest.mark.parametrize(
    "values, needles",
    [
        pytest.param(
            {"ray": {"download": {"replicas": -1}}},
            ["/ray/download/replicas", "minimum"],
            id="negative-replicas",
        ),
        pytest.param(
            {"serve": {"replicas": -2}}, ["/serve/replicas", "minimum"], id="negative-serve-replicas"
        ),
        pytest.param({"bogus": 1}, ["additional properties 'bogus' not allowed"], id="unknown-top-level-key"),
        pytest.param(
            {"ray": {"download": {"replica": 3}}}, ["/ray/download", "'replica'"], id="unknown-nested-key"
        ),
        pytest.param({"config": {"trian": {}}}, ["/config", "'trian'"], id="unknown-config-section"),
        pytest.param(
            {"prepare": {"extraArgs": ["--set", "x=1; rm -rf /"]}},
            ["/prepare/extraArgs/1"],
            id="shell-in-args",
        ),
        pytest.param(
            {"images": {"worker": {"pullPolicy": "Sometimes"}}}, ["/images/worker/pullPolicy"], id="enum"
        ),
        pytest.param({"prepare": {"runId": "Run_1"}}, ["/prepare/runId"], id="bad-run-id"),
    ],
)
def test_schema_rejects(values: dict, needles: list[str]) -> None:
    with pytest.raises(helm.HelmValuesError) as info:
        _chart().validate_schema(values)
    for needle in needles:
        assert needle in str(info.value)
    with pytest.raises(helm.HelmError):
        render_chart(values)


@pytest.mark.parametrize(
    "values, needles",
    [
        pytest.param(
            {"train": {"enabled": True, "gpusPerWorker": 2}},
            ["train.gpusPerWorker=2", "images.train.repository is empty"],
            id="gpus-without-train-image",
        ),
        pytest.param(
            {"export": {"enabled": True}},
            ["export.enabled", "images.train.repository is empty"],
            id="export-without-train-image",
        ),
        pytest.param(
            {"kuberay": {"rayJobSupport": False}, "prepare": {"enabled": True}},
            ["prepare.enabled=true", "kuberay.rayJobSupport=false", "kuberay-operator"],
            id="rayjob-unsupported",
        ),
        pytest.param(
            {"ray": {"download": {"minReplicas": 5, "maxReplicas": 2, "replicas": 2}}},
            ["ray.download.minReplicas (5) must be <= ray.download.maxReplicas (2)"],
            id="min-above-max",
        ),
        pytest.param(
            {"ray": {"download": {"minReplicas": 1, "maxReplicas": 3, "replicas": 4}}},
            ["ray.download.replicas (4)"],
            id="replicas-outside-bounds",
        ),
        pytest.param(
            {
                "images": {"train": {"repository": "t"}},
                "train": {"enabled": True, "workers": 3, "indexedJob": False},
            },
            ["train.workers=3", "train.indexedJob=true"],
            id="multiworker-without-indexed-job",
        ),
        pytest.param(
            {"prepare": {"useExistingCluster": True}},
            ["prepare.useExistingCluster=true", "rayCluster.enabled=false"],
            id="attach-without-raycluster",
        ),
        pytest.param(
            {"serve": {"enabled": True, "autoscaling": {"minReplicas": 4, "maxReplicas": 2}}},
            ["serve.autoscaling.minReplicas (4)"],
            id="serve-min-above-max",
        ),
        pytest.param(
            {"objectStore": {"createSecret": {"enabled": True}}},
            ["objectStore.createSecret.accessKeyId"],
            id="created-secret-without-keys",
        ),
        pytest.param(
            {
                "objectStore": {
                    "existingSecret": "x",
                    "createSecret": {"enabled": True, "accessKeyId": "a", "secretAccessKey": "b"},
                }
            },
            ["objectStore.existingSecret (x)"],
            id="two-secrets",
        ),
        pytest.param(
            {
                "images": {"train": {"repository": "t"}},
                "tensorboard": {"enabled": True},
                "config": {"train": {"model_dir": "s3://b/model"}},
            },
            ["s3://b/model", "tensorboard"],
            id="tensorboard-on-s3",
        ),
    ],
)
def test_cross_field_rules_fail_the_render(values: dict, needles: list[str]) -> None:
    _chart().validate_schema(values)  # schema-valid: only the templates can refuse these
    with pytest.raises(helm.HelmRenderError) as info:
        render_chart(values)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message


def test_several_rule_violations_are_reported_together() -> None:
    with pytest.raises(helm.HelmRenderError) as info:
        render_chart(
            {
                "kuberay": {"rayJobSupport": False},
                "ray": {"download": {"minReplicas": 3, "maxReplicas": 1, "replicas": 1}},
            }
        )
    assert "kuberay.rayJobSupport=false" in str(info.value)
    assert "ray.download.minReplicas (3)" in str(info.value)


# --------------------------------------------------------------------------- Ray: RayCluster and RayJob


def _download_group(spec: dict) -> dict:
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "download"]
    return group


@pytest.mark.parametrize("replicas, lo, hi", [(1, 1, 1), (3, 2, 7), (10, 0, 50)])
def test_download_group_follows_values(replicas: int, lo: int, hi: int) -> None:
    objs = render_chart(
        {
            "rayCluster": {"enabled": True},
            "ray": {
                "download": {
                    "replicas": replicas,
                    "minReplicas": lo,
                    "maxReplicas": hi,
                    "resources": {
                        "limits": {"cpu": "3", "memory": "6Gi"},
                        "requests": {"cpu": "3", "memory": "6Gi"},
                    },
                }
            },
        }
    )
    (cluster,) = find(objs, "RayCluster")
    (job,) = find(objs, "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        group = _download_group(spec)
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (replicas, lo, hi)
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"] == {"cpu": "3", "memory": "6Gi"}
        shm = {v["name"]: v for v in group["template"]["spec"]["volumes"]}["dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_autoscaling_toggle() -> None:
    (off,) = find(render_chart({"rayCluster": {"enabled": True}}), "RayCluster")
    assert off["spec"]["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in off["spec"]
    assert off["spec"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False

    objs = render_chart(scenario_values("ci/autoscaling-values.yaml"))
    (on,) = find(objs, "RayCluster")
    assert on["spec"]["enableInTreeAutoscaling"] is True
    opts = on["spec"]["autoscalerOptions"]
    assert opts["upscalingMode"] == "Aggressive" and opts["idleTimeoutSeconds"] == 120
    assert opts["securityContext"]["readOnlyRootFilesystem"] is True
    assert opts["resources"]["limits"] and opts["resources"]["requests"]
    group = _download_group(on["spec"])
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 20)
    # The autoscaler sidecar KubeRay injects needs the API token.
    assert on["spec"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True


def test_prepare_entrypoint_is_a_cli_command() -> None:
    assert prepare_entrypoint() == f"oiod prepare -c {CONFIG_PATH}"
    extra = {"prepare": {"extraArgs": ["--set", "ray.num_actors=8", "--retry-failed"]}}
    assert shlex.split(prepare_entrypoint(extra)) == [
        "oiod",
        "prepare",
        "-c",
        CONFIG_PATH,
        "--set",
        "ray.num_actors=8",
        "--retry-failed",
    ]
    assert f"oiod prepare -c {CONFIG_PATH}" in render_notes()


def test_rayjob_with_its_own_cluster() -> None:
    objs = render_chart({"prepare": {"runId": "7", "backoffLimit": 3, "activeDeadlineSeconds": 3600}})
    (job,) = find(objs, "RayJob")
    spec = job["spec"]
    assert job["metadata"]["name"] == f"{RELEASE}-openimages-od-prepare-7"
    assert "clusterSelector" not in spec and "rayClusterSpec" in spec
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (3, 3600)
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    assert not find(objs, "RayCluster")
    # The job's driver runs on the head: it needs the config and the store settings.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    assert {"name": "config", "mountPath": "/etc/oiod", "readOnly": True} in container["volumeMounts"]


def test_rayjob_attached_to_the_chart_raycluster() -> None:
    objs = render_chart(scenario_values("ci/autoscaling-values.yaml"))
    (cluster,) = find(objs, "RayCluster")
    (job,) = find(objs, "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in job["spec"]
    # A shared cluster must survive the job (KubeRay also refuses true here).
    assert job["spec"]["shutdownAfterJobFinishes"] is False
    assert shlex.split(job["spec"]["entrypoint"])[:4] == ["oiod", "prepare", "-c", CONFIG_PATH]


def test_prepare_can_be_disabled() -> None:
    objs = render_chart({"prepare": {"enabled": False}, "kuberay": {"rayJobSupport": False}})
    assert not find(objs, "RayJob") and not find(objs, "RayCluster")


# --------------------------------------------------------------------------- training, evaluation, export, TensorBoard


def test_multiworker_training_is_an_indexed_job_with_headless_service() -> None:
    objs = render_chart(scenario_values("ci/gpu-multiworker-values.yaml"))
    (job,) = find(objs, "Job", "-train-gpu-1")
    (svc,) = find(objs, "Service", "-train-workers")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"][0]["port"] == 2222
    # The service selects exactly this run's pods.
    labels = pod.get("labels") or spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    (c,) = pod["containers"]
    env = container_env(c)
    assert env["OIOD_NUM_WORKERS"] == "4"
    assert env["OIOD_WORKER_PORT"] == "2222"
    assert env["OIOD_JOB_NAME"] == job["metadata"]["name"]
    assert env["OIOD_WORKER_SERVICE"] == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert c["command"] == ["oiod", "train", "-c", CONFIG_PATH]
    assert (
        c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["resources"]["requests"]["nvidia.com/gpu"] == 2
    )
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
    (pvc,) = find(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_training_env_yields_tf_config() -> None:
    """The Python side builds TF_CONFIG from exactly the env the chart sets."""
    distribution = pytest.importorskip("openimages_od.training.distribution")
    objs = render_chart(scenario_values("ci/gpu-multiworker-values.yaml"))
    (job,) = find(objs, "Job", "-train-gpu-1")
    (svc,) = find(objs, "Service", "-train-workers")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {k: v for k, v in container_env(c).items() if isinstance(v, str)}
    env["JOB_COMPLETION_INDEX"] = "2"  # set by Kubernetes in an Indexed Job
    conf = distribution.tf_config_from_env(env)
    host = f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert conf["cluster"]["worker"] == [f"{job['metadata']['name']}-{i}.{host}:2222" for i in range(4)]
    assert conf["task"] == {"type": "worker", "index": 2}


def test_single_worker_training_is_a_plain_job() -> None:
    objs = render_chart(
        {"images": {"train": {"repository": "r/train", "tag": "1"}}, "train": {"enabled": True}}
    )
    (job,) = find(objs, "Job", "-train-1")
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert not find(objs, "Service", "-train-workers")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "r/train:1"
    assert container_env(c)["OIOD_NUM_WORKERS"] == "1"


def test_cpu_training_needs_no_gpu_but_an_image() -> None:
    values = {"images": {"train": {"repository": "r/train"}}, "train": {"enabled": True, "gpusPerWorker": 0}}
    (job,) = find(render_chart(values), "Job", "-train-1")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_evaluate_export_tensorboard_commands() -> None:
    objs = render_chart(scenario_values("ci/gpu-multiworker-values.yaml"))
    (ev,) = find(objs, "Job", "-evaluate-1")
    (c,) = ev["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["oiod", "evaluate", "-c", CONFIG_PATH, "--continuous"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (ex,) = find(objs, "Job", "-export-1")
    (c,) = ex["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["oiod", "export", "-c", CONFIG_PATH]
    (tb,) = find(objs, "Deployment", "-tensorboard")
    (c,) = tb["spec"]["template"]["spec"]["containers"]
    assert c["command"] == [
        "tensorboard",
        "--logdir",
        "/models/gpu/model",
        "--host",
        "0.0.0.0",
        "--port",
        "6006",
    ]
    (tbs,) = find(objs, "Service", "-tensorboard")
    assert tbs["spec"]["ports"][0]["port"] == 6006


# --------------------------------------------------------------------------- serving


def test_serving_objects() -> None:
    objs = render_chart(scenario_values("ci/gpu-multiworker-values.yaml"))
    (dep,) = find(objs, "Deployment", "-serve")
    assert "replicas" not in dep["spec"]  # the HPA owns it
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["oiod", "serve", "-c", CONFIG_PATH, "--host", "0.0.0.0", "--port", "8080"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["image"] == "openimages-od-serve:0.1.0"
    (hpa,) = find(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (pdb,) = find(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    (svc,) = find(objs, "Service", "-serve")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_serving_without_hpa_has_fixed_replicas() -> None:
    objs = render_chart(scenario_values("ci/external-s3-values.yaml"))
    (dep,) = find(objs, "Deployment", "-serve")
    assert dep["spec"]["replicas"] == 3
    assert not find(objs, "HorizontalPodAutoscaler")


def test_components_toggle_independently() -> None:
    base = {"images": {"train": {"repository": "r/train"}}, "prepare": {"enabled": False}}
    kinds_of = {
        "train": ("Job", "-train-1"),
        "evaluate": ("Job", "-evaluate-1"),
        "export": ("Job", "-export-1"),
        "serve": ("Deployment", "-serve"),
    }
    for component, (kind, suffix) in kinds_of.items():
        objs = render_chart({**base, component: {"enabled": True}})
        assert find(objs, kind, suffix), component
        others = [c for c in kinds_of if c != component]
        assert not any(find(objs, *kinds_of[o]) for o in others), component


# --------------------------------------------------------------------------- object store credentials


def test_existing_secret_and_external_endpoint() -> None:
    objs = render_chart(scenario_values("ci/external-s3-values.yaml"))
    assert not find(objs, "Secret")
    for obj in objs:
        for label, pod in pod_specs(obj):
            if label.endswith("/submitter"):
                continue  # only runs `ray job submit`
            for c in pod["containers"]:
                env = container_env(c)
                assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "oiod-s3", "key": "access-key"}}
                assert env["AWS_SECRET_ACCESS_KEY"] == {
                    "secretKeyRef": {"name": "oiod-s3", "key": "secret-key"}
                }
                assert env["OIOD_S3_ENDPOINT"] == env["AWS_ENDPOINT_URL"] == "https://s3.storage.example.com"
                assert env["AWS_REGION"] == "eu-central-1"


def test_chart_created_secret() -> None:
    objs = render_chart(
        {
            "objectStore": {
                "endpoint": "http://seaweedfs:8333",
                "setAwsEndpointUrl": False,
                "createSecret": {"enabled": True, "accessKeyId": "k", "secretAccessKey": "s"},
            }
        }
    )
    (secret,) = find(objs, "Secret")
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    (job,) = find(objs, "RayJob")
    (c,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    env = container_env(c)
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert env["OIOD_S3_ENDPOINT"] == "http://seaweedfs:8333" and "AWS_ENDPOINT_URL" not in env


def test_no_keys_when_using_workload_identity() -> None:
    objs = render_chart(scenario_values("k8s/values-eks-gpu.yaml"))
    (sa,) = find(objs, "ServiceAccount", "-ray-worker")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    # Least privilege: components that never touch the bucket get no cloud role.
    for name in ("-tensorboard", "-prepare-submitter", "-test"):
        for other in find(objs, "ServiceAccount", name):
            assert "annotations" not in other["metadata"], other["metadata"]["name"]
    (job,) = find(objs, "RayJob")
    (c,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    env = container_env(c)
    assert "AWS_ACCESS_KEY_ID" not in env and "OIOD_S3_ENDPOINT" not in env
    assert env["AWS_REGION"] == "us-west-2"


# --------------------------------------------------------------------------- chart hygiene: docs, schema, provenance


def _schema_objects(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            yield path, node
        for key, val in node.items():
            yield from _schema_objects(val, f"{path}/{key}")
    elif isinstance(node, list):
        for i, val in enumerate(node):
            yield from _schema_objects(val, f"{path}/{i}")


def test_schema_forbids_unknown_keys_everywhere() -> None:
    schema = _chart().schema
    objects = list(_schema_objects(schema))
    assert len(objects) > 20
    for path, node in objects:
        assert node.get("additionalProperties") is False, path


# Maps whose keys are data (resource names, labels, ray start flags), not settings.
_FREE_FORM = {"requests", "limits", "rayStartParams", "nodeSelector", "annotations", "commonLabels"}


def test_every_value_is_documented() -> None:
    undocumented = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    documented = False
    for line in (CHART_DIR / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            documented = True
            continue
        if not stripped or stripped.startswith("#"):
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
        if not m or stripped.startswith("-"):
            documented = False
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = [k for _, k in stack]
        is_section = line.rstrip().endswith(":")  # a mapping with documented children
        inside_free_form = any(p in _FREE_FORM for p in parents) or "tolerations" in parents
        if not (documented or is_section or inside_free_form):
            undocumented.append(".".join(parents + [key]))
        stack.append((indent, key))
        documented = False
    assert not undocumented, f"values without a '# --' comment: {undocumented}"


def test_values_yaml_matches_schema_and_defaults_render() -> None:
    _chart().validate_schema(_chart().values)
    kinds = sorted(o["kind"] for o in render_chart())
    assert kinds == [
        "ConfigMap",
        "NetworkPolicy",
        "RayJob",
        "ServiceAccount",
        "ServiceAccount",
        "ServiceAccount",
    ]


def test_readme_documents_operator_and_steps() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    for needle in (
        "helm repo add kuberay",
        "kuberay-operator",
        "prepare.runId",
        "train.runId",
        "export.runId",
        "kubectl delete job",
        "serve.enabled",
        "kuberay.rayJobSupport",
    ):
        assert needle in readme, needle


def test_crd_copies_match_the_shared_reference() -> None:
    readme = (CRD_DIR / "README.md").read_text()
    assert "ray.io_rayclusters" in readme and "ray.io_rayjobs" in readme
    if not SHARED_CRD_DIR.is_dir():
        pytest.skip("shared reference folder not present")
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        assert (CRD_DIR / name).read_bytes() == (SHARED_CRD_DIR / name).read_bytes(), name


def test_crd_validation_catches_mistakes() -> None:
    """The strict CRD check is not a rubber stamp."""
    (job,) = find(render_chart(), "RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(AssertionError, match="replica"):
        validate_object(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["backoffLimit"] = "two"
    with pytest.raises(AssertionError, match="backoffLimit"):
        validate_object(bad)


# --------------------------------------------------------------------------- k8s/ manifests


@pytest.mark.parametrize(
    "path", sorted(p.name for p in K8S_DIR.glob("*.yaml") if not p.name.startswith("values-"))
)
def test_k8s_manifests_validate(path: str) -> None:
    objs = _docs((K8S_DIR / path).read_text())
    assert objs
    for obj in objs:
        validate_object(obj)
        if obj["kind"] in ("RayJob", "RayCluster"):
            assert not kuberay_operator_errors(obj), kuberay_operator_errors(obj)
        for label, pod in pod_specs(obj):
            assert pod["securityContext"]["runAsNonRoot"] is True, label
            for c in pod["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True, label
                assert c["resources"]["limits"] and c["resources"]["requests"], label


def test_example_rayjob_targets_the_chart_raycluster() -> None:
    (job,) = _docs((K8S_DIR / "rayjob-prepare-existing-cluster.yaml").read_text())
    (cluster,) = find(render_chart({"rayCluster": {"enabled": True}}), "RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["shutdownAfterJobFinishes"] is False
    assert shlex.split(job["spec"]["entrypoint"])[:4] == ["oiod", "prepare", "-c", CONFIG_PATH]


def test_seaweedfs_dev_serves_s3_on_8333() -> None:
    objs = _docs((K8S_DIR / "seaweedfs-dev.yaml").read_text())
    (svc,) = find(objs, "Service")
    assert svc["spec"]["ports"][0]["port"] == 8333
    (dep,) = find(objs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "-s3" in c["command"] and "-s3.port=8333" in c["command"]
    assert not c["image"].endswith(":latest") and ":" in c["image"]
    # The most the volumes can hold must fit the data volume's sizeLimit, or the kubelet evicts the pod when
    # it fills up; the count must be explicit (the default of 8 runs out with a few buckets).
    flags = dict(a.split("=", 1) for a in c["command"] if a.startswith("-") and "=" in a)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == flags["-dir"]]
    (data,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    limit_gi = int(data["emptyDir"]["sizeLimit"].removesuffix("Gi"))
    assert int(flags["-volume.max"]) * int(flags["-master.volumeSizeLimitMB"]) < limit_gi * 1024


# --------------------------------------------------------------------------- what the KubeRay operator rejects (issue 13)
#
# KubeRay validates RayJob/RayCluster in its controller (ray-operator/controllers/ray/utils/validation.go), after
# the API server accepted them, so a rejected object just sits in ValidationFailed. The CRD schema cannot express
# these rules: kuberay_operator_errors() restates the ones reachable from this chart (KubeRay 1.5-1.6) and every
# scenario must pass them; _validate.tpl refuses the values that would produce a violation.

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL|SESSION", re.I)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _cluster_spec_errors(spec: dict) -> list[str]:
    errors = []
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{name}: no container")
        params = group.get("rayStartParams", {})
        if group.get("resources") and any(
            params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")
        ):
            errors.append(f"{name}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams.labels")
        if params.get("redis-username"):
            errors.append(f"{name}: redis-username")
    head_env = {e["name"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
    if "RAY_REDIS_ADDRESS" in head_env and not spec.get("gcsFaultToleranceOptions"):
        errors.append("RAY_REDIS_ADDRESS without gcsFaultToleranceOptions")
    if "REDIS_USERNAME" in head_env:
        errors.append("REDIS_USERNAME env")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        if not spec.get("rayVersion") or _version_tuple(spec["rayVersion"]) < (2, 52, 0):
            errors.append("authOptions.mode=token needs rayVersion >= 2.52.0")
    return errors


def kuberay_operator_errors(obj: dict) -> list[str]:
    """What KubeRay's ValidateRay{Cluster,Job}{Metadata,Spec} would say about one object ([] = accepted)."""
    errors = []
    name = obj["metadata"]["name"]
    limit = 47 if obj["kind"] == "RayJob" else 63
    if len(name) > limit or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"name {name!r}: DNS-1035 label of at most {limit} characters")
    spec = obj["spec"]
    if obj["kind"] == "RayCluster":
        return errors + _cluster_spec_errors(spec)
    selector = spec.get("clusterSelector") or {}
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        errors.append("suspend without shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append("negative ttlSecondsAfterFinished")
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    if not spec.get("rayClusterSpec") and not selector:
        errors.append("neither rayClusterSpec nor clusterSelector")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append("clusterSelector without ray.io/cluster")
        if spec.get("submissionMode") == "SidecarMode":
            errors.append("clusterSelector in SidecarMode")
        if spec.get("suspend"):
            errors.append("suspend with clusterSelector")
        if (
            spec.get("backoffLimit", 0) > 0
        ):  # KubeRay >= 1.6 (PR 4527): a retry would delete the shared cluster
            errors.append("backoffLimit with clusterSelector")
    if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append("backoffLimit in InteractiveMode")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        errors.append("activeDeadlineSeconds <= 0")
    if spec.get("backoffLimit", 0) < 0:
        errors.append("negative backoffLimit")
    if spec.get("rayClusterSpec"):
        errors += _cluster_spec_errors(spec["rayClusterSpec"])
    return errors


def test_kuberay_would_accept_every_scenario(scenario: tuple[str, dict, list[dict]]) -> None:
    name, _, objs = scenario
    for obj in objs:
        if obj["kind"] in ("RayJob", "RayCluster"):
            assert not kuberay_operator_errors(obj), (
                name,
                obj["metadata"]["name"],
                kuberay_operator_errors(obj),
            )


def test_operator_rules_are_not_a_rubber_stamp() -> None:
    """The restated rules catch what the old chart rendered (backoffLimit next to clusterSelector)."""
    (job,) = find(render_chart(scenario_values("ci/autoscaling-values.yaml")), "RayJob")
    assert "backoffLimit" not in job["spec"] and job["spec"]["clusterSelector"]
    old = copy.deepcopy(job)
    old["spec"]["backoffLimit"] = 1  # what templates/rayjob.yaml rendered before issue 13
    assert kuberay_operator_errors(old) == ["backoffLimit with clusterSelector"]
    (own,) = find(render_chart(), "RayJob")
    bad = copy.deepcopy(own)
    bad["spec"]["shutdownAfterJobFinishes"] = False
    bad["spec"]["rayClusterSpec"]["rayVersion"] = "2.50.0"
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["labels"] = "a=b"
    assert len(kuberay_operator_errors(bad)) == 3, kuberay_operator_errors(bad)


@pytest.mark.parametrize(
    "values, needles",
    [
        pytest.param(
            {"ray": {"head": {"rayStartParams": {"labels": "zone=a"}}}},
            ["rayStartParams.labels"],
            id="labels",
        ),
        pytest.param(
            {"ray": {"download": {"rayStartParams": {"redis-username": "u"}}}},
            ["redis-username"],
            id="redis-user",
        ),
        pytest.param(
            {"ray": {"rayVersion": "2.50.0"}},
            ["ray.auth.mode=token needs Ray >= 2.52.0", "2.50.0"],
            id="auth-old-ray",
        ),
        pytest.param(
            {"ray": {"auth": {"mode": "disabled"}}, "networkPolicy": {"enabled": False}},
            ["ray.auth.mode=disabled with networkPolicy.enabled=false"],
            id="ray-wide-open",
        ),
        pytest.param(
            {"config": {"ray": {"forward_env": ["AWS_SECRET_ACCESS_KEY"]}}},
            ["config.ray.forward_env lists AWS_SECRET_ACCESS_KEY"],
            id="secret-in-runtime-env",
        ),
        pytest.param(
            {"prepare": {"clusterName": "other"}},
            ["prepare.clusterName=other only applies"],
            id="stray-cluster-name",
        ),
    ],
)
def test_render_refuses_what_the_operator_or_a_leak_would(values: dict, needles: list[str]) -> None:
    with pytest.raises(Exception) as info:
        render_chart(values)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_release_names_kuberay_rejects_are_refused() -> None:
    with pytest.raises(Exception, match="not a DNS-1035 label"):
        render_chart(release="1st")
    objs = render_chart({"fullnameOverride": "first"}, release="1st")
    (job,) = find(objs, "RayJob")
    assert not kuberay_operator_errors(job)


def test_existing_cluster_by_name_has_no_retries() -> None:
    objs = render_chart({"prepare": {"useExistingCluster": True, "clusterName": "team-ray"}})
    (job,) = find(objs, "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "team-ray"}
    assert "backoffLimit" not in job["spec"] and "ttlSecondsAfterFinished" not in job["spec"]
    assert not kuberay_operator_errors(job) and not find(objs, "RayCluster")


# --------------------------------------------------------------------------- secrets stay secret (issue 13)


def _ray_cluster_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    out = [(o["metadata"]["name"], o["spec"]) for o in find(objs, "RayCluster")]
    out += [
        (o["metadata"]["name"], o["spec"]["rayClusterSpec"])
        for o in find(objs, "RayJob")
        if "rayClusterSpec" in o["spec"]
    ]
    return out


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_every_ray_cluster_has_token_auth_or_a_network_policy(scenario: tuple[str, dict, list[dict]]) -> None:
    name, _, objs = scenario
    policies = find(objs, "NetworkPolicy")
    for cluster, spec in _ray_cluster_specs(objs):
        token = (spec.get("authOptions") or {}).get("mode") == "token"
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        fenced = all(
            any(_selects(p["spec"]["podSelector"], pod["metadata"]["labels"]) for p in policies)
            for pod in pods
        )
        assert token or fenced, (name, cluster)
        assert token and fenced, f"{name}: the defaults give both ({cluster})"


def test_network_policy_admits_only_the_release_and_the_operator() -> None:
    objs = render_chart({"rayCluster": {"enabled": True}})
    (policy,) = find(objs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    (cluster,) = find(objs, "RayCluster")
    (job,) = find(objs, "RayJob")
    own_pods = [
        cluster["spec"]["headGroupSpec"]["template"],
        cluster["spec"]["workerGroupSpecs"][0]["template"],
        job["spec"]["submitterPodTemplate"],
    ]
    for pod in own_pods[:2]:
        assert _selects(spec["podSelector"], pod["metadata"]["labels"])
    release_rule, operator_rule = spec["ingress"]
    (peer,) = release_rule["from"]
    assert set(peer) == {"podSelector"}  # same namespace only
    for pod in own_pods:  # Ray nodes and the submitter reach every Ray port
        assert _selects(peer["podSelector"], pod["metadata"]["labels"])
    other_release = {**own_pods[0]["metadata"]["labels"], "app.kubernetes.io/instance": "someone-else"}
    assert not _selects(peer["podSelector"], other_release)
    serving = {**own_pods[0]["metadata"]["labels"], "app.kubernetes.io/component": "serve"}
    assert not _selects(peer["podSelector"], serving)  # the release's other pods have no business with Ray
    (op,) = operator_rule["from"]
    assert op["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
    assert operator_rule["ports"] == [{"protocol": "TCP", "port": 8265}]


def test_no_secret_travels_through_runtime_env(
    scenario: tuple[str, dict, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_mod = pytest.importorskip("openimages_od.config")
    name, _, objs = scenario
    (cm,) = find(objs, "ConfigMap", "-config")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    for key, val in _plain_env(objs).items():
        monkeypatch.setenv(key, val)
    cfg = config_mod.load_config(path, overrides=[])
    leaked = [v for v in cfg.ray.forward_env if _SECRET_NAME.search(v)]
    assert not leaked, (name, leaked)
    for job in find(objs, "RayJob"):
        assert "runtimeEnvYAML" not in job["spec"], name
        assert "forward_env" not in job["spec"]["entrypoint"], name


def test_tensorboard_gets_no_object_store_keys() -> None:
    objs = render_chart(
        scenario_values("ci/gpu-multiworker-values.yaml") | {"objectStore": {"existingSecret": "s3-keys"}}
    )
    (tb,) = find(objs, "Deployment", "-tensorboard")
    (c,) = tb["spec"]["template"]["spec"]["containers"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(container_env(c))
    (train,) = find(objs, "Job", "-train-gpu-1")
    assert "AWS_SECRET_ACCESS_KEY" in container_env(train["spec"]["template"]["spec"]["containers"][0])


def test_ray_workers_get_credentials_from_the_secret_only() -> None:
    objs = render_chart(scenario_values("ci/external-s3-values.yaml") | {"prepare": {"enabled": True}})
    for _, spec in _ray_cluster_specs(objs):
        for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            env = container_env(pod["spec"]["containers"][0])
            assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "oiod-s3", "key": "secret-key"}}


# --------------------------------------------------------------------------- lifecycles (issue 13)


def _pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "Job"):
        yield obj["kind"], spec["template"]
    elif obj["kind"] == "RayJob":
        yield "RayJob", spec["submitterPodTemplate"]
        if "rayClusterSpec" in spec:
            yield "RayJob", spec["rayClusterSpec"]["headGroupSpec"]["template"]
            for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
                yield "RayJob", g["template"]
    elif obj["kind"] == "RayCluster":
        yield "RayCluster", spec["headGroupSpec"]["template"]
        for g in spec["workerGroupSpecs"]:
            yield "RayCluster", g["template"]


def test_no_version_labels_in_pod_templates(scenario: tuple[str, dict, list[dict]]) -> None:
    name, _, objs = scenario
    for obj in objs:
        for kind, template in _pod_templates(obj):
            labels = template["metadata"]["labels"]
            assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels, (name, kind)


def test_job_templates_survive_a_chart_version_bump(tmp_path: Path) -> None:
    """`helm upgrade` to a new chart version must not change any (immutable) Job pod template."""
    import shutil

    bumped = tmp_path / "openimages-od"
    shutil.copytree(CHART_DIR, bumped)
    chart_yaml = bumped / "Chart.yaml"
    chart_yaml.write_text(re.sub(r"(?m)^(version|appVersion): .*$", r'\1: "9.9.9"', chart_yaml.read_text()))
    values = scenario_values("ci/gpu-multiworker-values.yaml")
    new = helm.Chart.load(str(bumped)).render(values, name=RELEASE, namespace=NAMESPACE, is_install=False)
    new_objs = [d for k, v in sorted(new.items()) if not k.endswith("NOTES.txt") for d in _docs(v)]
    old_jobs = {j["metadata"]["name"]: j for j in find(render_chart(values), "Job")}
    new_jobs = {j["metadata"]["name"]: j for j in find(new_objs, "Job")}
    assert old_jobs.keys() == new_jobs.keys() and len(old_jobs) == 3
    for job_name, job in old_jobs.items():
        assert job["spec"]["template"] == new_jobs[job_name]["spec"]["template"], job_name
        assert (
            job["metadata"]["labels"] != new_jobs[job_name]["metadata"]["labels"]
        )  # the Job's own labels may move


def test_evaluator_does_not_restart_after_its_final_step(scenario: tuple[str, dict, list[dict]]) -> None:
    name, _, objs = scenario
    for obj in objs:
        for label, pod in pod_specs(obj):
            for c in pod["containers"]:
                if c.get("command", [])[:2] == ["oiod", "evaluate"]:
                    # A Deployment restarts a container that exits 0; a Job with Never does not.
                    assert obj["kind"] == "Job" and pod["restartPolicy"] == "Never", (name, label)
                    assert obj["spec"]["activeDeadlineSeconds"] > 0


def test_each_component_has_its_own_service_account() -> None:
    values = scenario_values("ci/gpu-multiworker-values.yaml") | {"prepare": {"enabled": True}}
    values["serviceAccount"] = {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}}
    objs = render_chart(values)
    accounts = {sa["metadata"]["name"]: sa for sa in find(objs, "ServiceAccount")}
    used: dict[str, set[str]] = {}
    for obj in objs:
        for label, pod in pod_specs(obj):
            used.setdefault(pod["serviceAccountName"], set()).add(
                label.split("/")[0] + "/" + label.split("/")[-1]
            )
            if not (label.endswith("/head") and pod["automountServiceAccountToken"]):
                assert pod["automountServiceAccountToken"] is False, label
    assert set(used) <= set(accounts), set(used) - set(accounts)
    assert len(used) >= 8, used  # head, worker, submitter, train, evaluate, export, serve, tensorboard
    for sa in accounts.values():
        assert sa["automountServiceAccountToken"] is False
        bucket = not sa["metadata"]["name"].endswith(("-tensorboard", "-prepare-submitter", "-test"))
        assert ("annotations" in sa["metadata"]) == bucket, sa["metadata"]["name"]
    assert not find(objs, "Role") and not find(objs, "RoleBinding") and not find(objs, "ClusterRole")


_SCHEDULING = {
    "podAnnotations": {"example.com/team": "vision"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["batch"]}]}
                ]
            }
        }
    },
    "tolerations": [{"key": "pool", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}},
        }
    ],
    "priorityClassName": "batch-low",
    "nodeSelector": {"pool": "batch"},
}


def test_scheduling_is_settable_per_component() -> None:
    values: dict = {
        "images": {"train": {"repository": "r/train"}},
        "modelStorage": {"enabled": True},
        "config": {"train": {"model_dir": "/models/m"}},
        "rayCluster": {"enabled": True},
    }
    for c in ("prepare", "train", "evaluate", "export", "tensorboard", "serve"):
        values[c] = {"enabled": True, **_SCHEDULING}
    values["ray"] = {"head": _SCHEDULING, "download": _SCHEDULING}
    objs = render_chart(values)
    pods = 0
    for obj in objs:
        validate_object(obj)
        for _, template in _pod_templates(obj):
            pods += 1
            spec = template["spec"]
            for key in (
                "affinity",
                "tolerations",
                "topologySpreadConstraints",
                "priorityClassName",
                "nodeSelector",
            ):
                assert spec[key] == _SCHEDULING[key], (obj["metadata"]["name"], key)
            assert template["metadata"]["annotations"]["example.com/team"] == "vision"
    assert pods == 10  # RayCluster head+worker, RayJob head+worker+submitter, 3 Jobs, 2 Deployments
    (serve,) = find(objs, "Deployment", "-serve")
    assert "checksum/config" in serve["spec"]["template"]["metadata"]["annotations"]


def test_ray_probes_are_as_tolerant_as_kuberay() -> None:
    # KubeRay's defaults (utils/constant.go): readiness 10 x 5 s with a 2 s (worker) / 5 s (head) timeout,
    # liveness 120 x 5 s with the same timeouts.
    (job,) = find(render_chart(), "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    for role, template, timeout in (
        ("head", spec["headGroupSpec"]["template"], 5),
        ("worker", spec["workerGroupSpecs"][0]["template"], 2),
    ):
        (c,) = template["spec"]["containers"]
        ready, live = c["readinessProbe"], c["livenessProbe"]
        assert ready["timeoutSeconds"] >= timeout and live["timeoutSeconds"] >= timeout, role
        assert ready["failureThreshold"] * ready["periodSeconds"] >= 50, role
        assert live["failureThreshold"] * live["periodSeconds"] >= 600, role
        assert live["initialDelaySeconds"] >= 30, role


def test_multiworker_training_restarts_as_a_group_with_a_deadline() -> None:
    objs = render_chart(scenario_values("ci/gpu-multiworker-values.yaml"))
    (job,) = find(objs, "Job", "-train-gpu-1")
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec["backoffLimit"] == 2 * 4  # restarts x workers: one group restart fails every worker once
    assert spec["activeDeadlineSeconds"] > 0
    rules = spec["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "train", "operator": "In", "values": [2]},
    } in rules
    assert any(
        r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules
    )


def test_helm_test_hook_checks_the_serving_endpoint() -> None:
    objs = render_chart({"serve": {"enabled": True}, "prepare": {"enabled": False}})
    (pod,) = [o for o in objs if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (svc,) = find(objs, "Service", "-serve")
    (c,) = pod["spec"]["containers"]
    env = container_env(c)
    assert env["OIOD_TEST_URL"] == f"http://{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:80"
    script = c["command"][2]
    assert "/readyz" in script and "/v1/detect" in script
    assert c["image"] == "openimages-od-serve:0.1.0" and pod["spec"]["restartPolicy"] == "Never"
    compile(script, "helm-test", "exec")
    assert not [
        o
        for o in render_chart({"serve": {"enabled": True}, "helmTest": {"enabled": False}})
        if o["kind"] == "Pod"
    ]


# --------------------------------------------------------------------------- one knob scales prepare (issue 14)


def _worker_cpus(group: dict) -> float:
    cpu = str(
        group["rayStartParams"].get("num-cpus")
        or group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    )
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


def test_download_replicas_is_the_one_knob() -> None:
    """More replicas -> a bigger worker group, and nothing pins the actor count: actors follow the cluster."""
    for replicas in (2, 3):
        objs = render_chart({"ray": {"download": {"replicas": replicas, "maxReplicas": 4}}})
        (job,) = find(objs, "RayJob")
        (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert group["replicas"] == replicas
        (cm,) = find(objs, "ConfigMap", "-config")
        assert "num_actors" not in yaml.safe_load(cm["data"]["config.yaml"])["ray"]
        assert "num_actors" not in job["spec"]["entrypoint"]
        cpus_per_actor = yaml.safe_load(cm["data"]["config.yaml"])["ray"]["num_cpus_per_actor"]
        # What Ray will report, from which prepare derives its actors.
        assert replicas * _worker_cpus(group) / cpus_per_actor == 2 * replicas


def test_no_scenario_leaves_cpus_idle(scenario: tuple[str, dict, list[dict]]) -> None:
    """An explicit actor count below what the workers hold leaves CPUs idle (k8s/values-eks-gpu.yaml did)."""
    name, _, objs = scenario
    for job in find(objs, "RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        pinned = [a.split("=", 1)[1] for a in argv if a.startswith("ray.num_actors=")]
        (cm,) = find(objs, "ConfigMap", "-config")
        ray_cfg = yaml.safe_load(cm["data"]["config.yaml"])["ray"]
        if "num_actors" in ray_cfg:
            pinned.append(ray_cfg["num_actors"])
        clusters = _ray_cluster_specs(objs)
        ((_, spec),) = [
            c for c in clusters if c[0] == job["spec"].get("clusterSelector", {}).get("ray.io/cluster")
        ] or clusters
        (group,) = spec["workerGroupSpecs"]
        capacity = group["maxReplicas" if spec["enableInTreeAutoscaling"] else "replicas"] * _worker_cpus(
            group
        )
        for n in pinned:
            assert int(n) * float(ray_cfg.get("num_cpus_per_actor", 0.5)) >= capacity, (name, n, capacity)


def test_autoscaler_demand_reaches_max_replicas() -> None:
    objs = render_chart(scenario_values("ci/autoscaling-values.yaml"))
    (cluster,) = find(objs, "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True and group["maxReplicas"] == 20
    (job,) = find(objs, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    # 20 workers x 4 CPUs / 2 CPUs per actor: the actors that do not fit yet are the pending demand.
    assert argv[argv.index("--set") + 1] == "ray.num_actors=40"
    more = scenario_values("ci/autoscaling-values.yaml")
    more["ray"]["download"]["maxReplicas"] = 30
    (job,) = find(render_chart(more), "RayJob")
    assert "ray.num_actors=60" in job["spec"]["entrypoint"]
