"""The chart's pods, executed: each rendered pod template runs as a podman container.

No Kubernetes API server exists here, so this lane plays kubelet and KubeRay operator itself: it renders the
chart with the real Helm engine and starts each container of a pod template with exactly the image, command,
args, environment (ConfigMap-mounted config, Secret values resolved), user and group, read-only root
filesystem, dropped capabilities, no-new-privileges, CPU/memory limits and volumes (emptyDirs as tmpfs,
the ConfigMap as a read-only mount) the pod asks for. Where KubeRay fills in a pod (the ``ray start``
command of Ray containers, the submitter's ``ray job submit``, the token of ``authOptions``), the lane does
what KubeRay does (``kuberay_*`` helpers below, after ray-operator/controllers/ray/common/pod.go and
rayjob's K8sJobMode submitter).

All "pods" share the host network (``--network host``) on their own loopback addresses 127.0.1.2-127.0.1.9
(127.0.0.x belongs to other tests); because they share it, every fixed Ray port (GCS 6379, dashboard 8265,
agent 52365, ...) is moved to a free port, the only deviation from the rendered pods. SeaweedFS is the S3
store and the image server runs on loopback.

The worker and serve images are built by ``make images`` (``docker/build-images.sh``) or, when missing, by
the session fixture. The train image (~8 GB, ~7 min to build) is used only when present (``make
containers-train``); without it the train/evaluate/export/TensorBoard test is skipped.

Run: ``.venv/bin/python -m pytest -m containers tests/test_containers.py`` (root + podman).
"""

from __future__ import annotations

import base64
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from openimages_od.devservices import ImageServer, SeaweedFS, free_port
from openimages_od.synth import generate_dataset

pytestmark = [pytest.mark.containers, pytest.mark.integration, pytest.mark.k8s, pytest.mark.slow]

helm_chart = pytest.importorskip("test_helm_chart")

REPO = Path(__file__).resolve().parents[1]
PODMAN = shutil.which("podman")
TAG = os.environ.get("OIOD_IMAGE_TAG", "dev")
IMAGE = {name: f"localhost/openimages-od-{name}:{TAG}" for name in ("worker", "serve", "train")}
HEAD_IP, WORKER_IPS, IMAGES_IP, S3_IP, SERVE_IP = (
    "127.0.1.2",
    ("127.0.1.3", "127.0.1.4"),
    "127.0.1.6",
    "127.0.1.7",
    "127.0.1.8",
)

if not PODMAN or os.geteuid() != 0:
    pytest.skip("the container lane needs root and podman (make test installs it)", allow_module_level=True)


# --------------------------------------------------------------------------- images and containers


def image_exists(ref: str) -> bool:
    return subprocess.run([PODMAN, "image", "exists", ref], check=False).returncode == 0


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """The worker and serve images, built by docker/build-images.sh when missing."""
    missing = [n for n in ("worker", "serve") if not image_exists(IMAGE[n])]
    if missing:
        proc = subprocess.run(
            [str(REPO / "docker" / "build-images.sh"), *missing],
            env={**os.environ, "TAG": TAG},
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return IMAGE


def _quantity(value: Any) -> float:
    """A Kubernetes quantity as a number ("1500m" -> 1.5, "2Gi" -> 2147483648)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


class Pods:
    """Runs rendered pod templates with podman and removes every container it started."""

    def __init__(self, workdir: Path, objs: list[dict]) -> None:
        self.workdir = workdir
        self.objs = objs
        self.names: list[str] = []
        self.secrets = {
            s["metadata"]["name"]: s.get("stringData", {}) for s in helm_chart.find(objs, "Secret")
        }
        self.config_maps = {c["metadata"]["name"]: c["data"] for c in helm_chart.find(objs, "ConfigMap")}

    def _env(self, container: dict, extra: dict[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = str(e["value"])
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self.secrets[ref["name"]][ref["key"]]
        env.update(extra)
        return env

    def _mounts(self, pod: dict, container: dict, name: str) -> list[str]:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        args: list[str] = []
        for m in container.get("volumeMounts", []):
            vol = volumes[m["name"]]
            if "configMap" in vol:
                src = self.workdir / name / m["name"]
                src.mkdir(parents=True, exist_ok=True)
                for key, text in self.config_maps[vol["configMap"]["name"]].items():
                    (src / key).write_text(text)
                args += ["-v", f"{src}:{m['mountPath']}:ro"]
            elif vol.get("emptyDir", {}).get("medium") == "Memory" and m["mountPath"] == "/dev/shm":
                args += [f"--shm-size={int(_quantity(vol['emptyDir']['sizeLimit']))}"]
            elif "emptyDir" in vol:
                # An emptyDir is writable by the pod's users and, unlike podman's default tmpfs, executable.
                args += ["--tmpfs", f"{m['mountPath']}:rw,exec,mode=1777"]
            elif "persistentVolumeClaim" in vol:
                src = self.workdir / "pvc" / vol["persistentVolumeClaim"]["claimName"]
                src.mkdir(parents=True, exist_ok=True)
                os.chown(src, pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"])
                args += ["-v", f"{src}:{m['mountPath']}:rw"]
            else:
                raise AssertionError(f"volume kind not handled by the lane: {vol}")
        return args

    def podman_args(
        self, pod: dict, container: dict, name: str, extra_env: dict[str, str] | None = None
    ) -> list[str]:
        """`podman run` arguments that reproduce one container of a pod spec."""
        sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        args = [
            PODMAN,
            "run",
            "--name",
            name,
            "--pull=never",
            "--runtime",
            "runc",
            "--network",
            "host",
            # the host's hard limit here; KubeRay's `ulimit -n 65536` then fails harmlessly, as on small nodes
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=4096:4096",
            "--user",
            f"{sc['runAsUser']}:{sc['runAsGroup']}",
        ]
        if "fsGroup" in pod.get("securityContext", {}):
            args += ["--group-add", str(pod["securityContext"]["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]  # only the pod's own volumes are writable
        if "ALL" in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", "ALL"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        limits = container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            args += [f"--cpus={_quantity(limits['cpu']):g}"]
        if "memory" in limits:
            args += [f"--memory={int(_quantity(limits['memory']))}"]
        for key, val in self._env(container, extra_env or {}).items():
            args += ["-e", f"{key}={val}"]
        args += self._mounts(pod, container, name)
        return args

    def start(
        self,
        pod: dict,
        container: dict,
        name: str,
        argv: list[str],
        extra_env: dict[str, str] | None = None,
        detach: bool = True,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess:
        self.names.append(name)
        cmd = self.podman_args(pod, container, name, extra_env) + (["-d"] if detach else [])
        proc = subprocess.run(
            cmd + [container["image"], *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
        if detach:
            assert proc.returncode == 0, f"podman run {name}: {proc.stderr[-2000:]}"
        return proc

    def logs(self, name: str) -> str:
        proc = subprocess.run([PODMAN, "logs", name], capture_output=True, text=True, check=False)
        return (proc.stdout + proc.stderr)[-4000:]

    def running(self, name: str) -> bool:
        proc = subprocess.run(
            [PODMAN, "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True, check=False
        )
        return proc.stdout.strip() == "true"

    def cleanup(self) -> None:
        for name in self.names:
            subprocess.run([PODMAN, "rm", "-f", "-t", "5", name], capture_output=True, check=False)


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[Any]:
    made: list[Pods] = []

    def make(objs: list[dict]) -> Pods:
        made.append(Pods(tmp_path / "pods", objs))
        return made[-1]

    try:
        yield make
    finally:
        for p in made:
            p.cleanup()


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait_for(url: str, what: str, pods: Pods, name: str, timeout: float = 180) -> None:
    """Poll an HTTP probe as kubelet would until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_status(url) == 200:
            return
        if not pods.running(name):
            pytest.fail(f"{what} ({name}) exited:\n{pods.logs(name)}")
        time.sleep(1)
    pytest.fail(f"{what} not ready at {url} after {timeout}s:\n{pods.logs(name)}")


def probe_url(container: dict, kind: str, ip: str, port_map: dict[int, int]) -> str:
    get = container[kind]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    return f"http://{ip}:{port_map.get(port, port)}{get['path']}"


# --------------------------------------------------------------------------- what KubeRay adds to the pods


def kuberay_ray_start(
    group: dict, container: dict, *, head: bool, ip: str, ports: dict[str, int], gcs: str | None = None
) -> list[str]:
    """The container command KubeRay generates for a Ray node (common/pod.go), with moved fixed ports."""
    params = {k: str(v) for k, v in group["rayStartParams"].items()}
    limits = container["resources"]["limits"]
    params.setdefault("num-cpus", str(math.ceil(_quantity(limits["cpu"]))))  # KubeRay: from the CPU limit
    params.setdefault("memory", str(int(_quantity(limits["memory"]))))
    params["dashboard-agent-listen-port"] = str(ports["agent"])  # KubeRay's default 52365, moved
    params["metrics-export-port"] = str(ports["metrics"])  # default 8080, moved
    params["node-ip-address"] = ip
    if head:
        params.update(
            {
                "port": str(ports["gcs"]),
                "dashboard-port": str(ports["dashboard"]),
                "ray-client-server-port": str(ports["client"]),
            }
        )
    else:
        params["address"] = gcs or ""
    flags = " ".join(f"--{k}={v}" for k, v in sorted(params.items()))
    return ["/bin/bash", "-lc", f"ulimit -n 65536; ray start {'--head ' if head else ''}{flags} --block"]


def kuberay_ray_env(cluster: str, token: str) -> dict[str, str]:
    """Env KubeRay injects into Ray containers; with authOptions token, the token from its Secret."""
    return {
        "RAY_CLUSTER_NAME": cluster,
        "RAY_USAGE_STATS_KUBERAY_IN_USE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # Not KubeRay: Ray refuses to join nodes on one host's loopback without it (see ENVIRONMENT.md).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
    }


def kuberay_submitter_command(dashboard: str, submission_id: str, entrypoint: str) -> list[str]:
    """The K8sJobMode submitter: submit once (idempotent on retries), then follow the logs."""
    addr = f"http://{dashboard}"
    script = (
        f"if ! ray job status --address {addr} {submission_id} >/dev/null 2>&1; then "
        f"ray job submit --address {addr} --no-wait --submission-id {submission_id} -- {entrypoint}; fi; "
        f"ray job logs --address {addr} --follow {submission_id}"
    )
    return ["/bin/bash", "-lc", script]


# --------------------------------------------------------------------------- shared services


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedFS]:
    with SeaweedFS(ip=S3_IP) as sw:
        yield sw


def _objects(sw: SeaweedFS, bucket: str, prefix: str) -> dict[str, bytes]:
    client = sw.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"][len(prefix) :]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


def _dicts(node: Any) -> Iterator[dict]:
    """Every dict inside a JSON document."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _dicts(v)


def _object_store_values(sw: SeaweedFS) -> dict:
    return {
        "endpoint": sw.endpoint,
        "region": "us-east-1",
        "createSecret": {"enabled": True, "accessKeyId": sw.access_key, "secretAccessKey": sw.secret_key},
    }


# --------------------------------------------------------------------------- prepare: Ray head + 2 workers + submitter


def test_prepare_runs_in_the_chart_pods(images: dict, s3: SeaweedFS, pods: Any, tmp_path: Path) -> None:
    bucket = s3.create_bucket(f"c-{uuid.uuid4().hex[:10]}")
    with ImageServer(host=IMAGES_IP) as server:
        ds = generate_dataset(tmp_path / "data", 24, base_url=server.url(""), seed=13)
        for im in ds.images:
            server.add(f"original/{im.split}/{im.image_id}.jpg", im.jpeg)
        source = ds.source_config()
        # Metadata over HTTP too: the pods see nothing of this host's disk.
        for key in ("class_descriptions", "hierarchy"):
            source[key] = server.add(
                f"meta/{Path(source[key]).name}", Path(source[key]).read_bytes(), "text/plain"
            )
        for split, files in source["splits"].items():
            for key, path in files.items():
                files[key] = server.add(
                    f"meta/{split}/{Path(path).name}", Path(path).read_bytes(), "text/plain"
                )
        config = {
            "source": {**source, "images": {"order": ["original"]}},
            "selection": {"classes": ["Ball", "Window", "Traffic sign"]},
            "output": {
                "url": f"s3://{bucket}/k8s",
                "s3": {
                    "endpoint_url": "${OIOD_S3_ENDPOINT}",
                    "region": "us-east-1",
                    "addressing_style": "path",
                },
            },
            "ray": {
                "address": "auto",
                "num_cpus_per_actor": 1.0,
                "concurrency_per_actor": 8,
                "forward_env": [],
            },
            "shards": {"images_per_shard": 6},
        }
        small = {"requests": {"cpu": "1", "memory": "1536Mi"}, "limits": {"cpu": "1", "memory": "1536Mi"}}
        values = {
            "images": {"worker": {"repository": IMAGE["worker"].rsplit(":", 1)[0], "tag": TAG}},
            "objectStore": _object_store_values(s3),
            "config": config,
            "ray": {
                "head": {"resources": small, "rayStartParams": {"object-store-memory": "80000000"}},
                "download": {
                    "replicas": 2,
                    "resources": small,
                    "rayStartParams": {"object-store-memory": "80000000"},
                },
            },
        }
        objs = helm_chart.render_chart(values)
        (job,) = helm_chart.find(objs, "RayJob")
        spec = job["spec"]
        cluster = spec["rayClusterSpec"]
        assert cluster["authOptions"] == {"mode": "token"}
        p = pods(objs)
        token = secrets.token_hex(32)
        ray_env = kuberay_ray_env(job["metadata"]["name"], token)
        run = uuid.uuid4().hex[:6]

        head_group = cluster["headGroupSpec"]
        head_pod = head_group["template"]["spec"]
        (head_c,) = head_pod["containers"]
        hp = {k: free_port() for k in ("gcs", "dashboard", "client", "agent", "metrics")}
        gcs = f"{HEAD_IP}:{hp['gcs']}"
        head = f"oiod-c-head-{run}"
        p.start(
            head_pod,
            head_c,
            head,
            kuberay_ray_start(head_group, head_c, head=True, ip=HEAD_IP, ports=hp),
            {**ray_env, "RAY_ADDRESS": gcs},
        )
        port_map = {8265: hp["dashboard"], 52365: hp["agent"]}
        wait_for(probe_url(head_c, "readinessProbe", HEAD_IP, port_map), "head readiness probe", p, head)
        assert http_status(probe_url(head_c, "livenessProbe", HEAD_IP, port_map)) == 200

        (group,) = cluster["workerGroupSpecs"]
        worker_pod = group["template"]["spec"]
        (worker_c,) = worker_pod["containers"]
        workers = []
        for i, ip in enumerate(WORKER_IPS[: group["replicas"]]):
            wp = {k: free_port() for k in ("agent", "metrics")}
            name = f"oiod-c-worker{i}-{run}"
            p.start(
                worker_pod,
                worker_c,
                name,
                kuberay_ray_start(group, worker_c, head=False, ip=ip, ports=wp, gcs=gcs),
                ray_env,
            )
            workers.append((name, probe_url(worker_c, "readinessProbe", ip, {52365: wp["agent"]})))
        for name, url in workers:
            wait_for(url, "worker readiness probe", p, name)

        dashboard = f"{HEAD_IP}:{hp['dashboard']}"
        # Token auth: without the token the job API answers 401, with it 200.
        assert http_status(f"http://{dashboard}/api/jobs/") in (401, 403)
        auth = {"Authorization": f"Bearer {token}"}
        assert http_status(f"http://{dashboard}/api/jobs/", auth) == 200

        sub_pod = spec["submitterPodTemplate"]["spec"]
        (sub_c,) = sub_pod["containers"]
        submission = f"oiod-prepare-{run}"
        start = time.monotonic()
        proc = p.start(
            sub_pod,
            sub_c,
            f"oiod-c-submitter-{run}",
            kuberay_submitter_command(dashboard, submission, spec["entrypoint"]),
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
            detach=False,
            timeout=900,
        )
        lane_s = time.monotonic() - start
        with urllib.request.urlopen(
            urllib.request.Request(f"http://{dashboard}/api/jobs/{submission}", headers=auth), timeout=10
        ) as r:
            status = json.load(r)["status"]
        assert proc.returncode == 0 and status == "SUCCEEDED", (
            status,
            proc.stdout[-3000:],
            proc.stderr[-2000:],
            p.logs(head),
        )
        print(f"\n[containers] prepare in the chart's pods: {lane_s:.1f} s")

        # The download actors ran on both worker pods (the head advertises no CPU), and nothing the dashboard
        # serves, even to a holder of the token, contains the object-store secret: it reached the workers
        # through their pod environment, not a runtime_env.
        actors_url = f"http://{dashboard}/api/v0/actors?detail=1&limit=1000"
        assert http_status(actors_url) in (401, 403)
        with urllib.request.urlopen(urllib.request.Request(actors_url, headers=auth), timeout=30) as r:
            actors_body = r.read().decode()
        with urllib.request.urlopen(
            urllib.request.Request(f"http://{dashboard}/api/jobs/", headers=auth), timeout=30
        ) as r:
            jobs_body = r.read().decode()
        assert s3.secret_key not in actors_body and s3.secret_key not in jobs_body
        records = [rec for rec in _dicts(json.loads(actors_body)) if rec.get("class_name") == "ShardWorker"]
        assert records, actors_body[:2000]
        nodes = {ip for rec in records for ip in WORKER_IPS if ip in json.dumps(rec)}
        assert nodes == set(WORKER_IPS), (nodes, [json.dumps(r)[:300] for r in records])

        # The same config on this host (embedded Ray) gives the same shards, byte for byte.
        cfg_path = tmp_path / "host-config.yaml"
        (cm,) = helm_chart.find(objs, "ConfigMap", "-config")
        cfg_path.write_text(cm["data"]["config.yaml"])
        host_env = {
            **os.environ,
            **s3.env(),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "AWS_REGION": "us-east-1",
        }
        host = subprocess.run(
            [
                sys.executable,
                "-m",
                "openimages_od.cli",
                "prepare",
                "-c",
                str(cfg_path),
                "--set",
                "ray.address=local",
                "--set",
                f"output.url=s3://{bucket}/host",
                "--set",
                "ray.progress=false",
            ],
            env=host_env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert host.returncode == 0, host.stdout[-2000:] + host.stderr[-3000:]
    in_pods = {k: v for k, v in _objects(s3, bucket, "k8s/").items() if k.startswith("tfrecords/")}
    on_host = {k: v for k, v in _objects(s3, bucket, "host/").items() if k.startswith("tfrecords/")}
    shards = sorted(k for k in in_pods if k.endswith(".tfrecord"))
    assert len(shards) >= 2 and sorted(k for k in on_host if k.endswith(".tfrecord")) == shards
    for key in shards:
        assert in_pods[key] == on_host[key], key


def test_dashboard_api_refuses_requests_without_the_token_and_shows_no_credentials() -> None:
    """Covered live in test_prepare_runs_in_the_chart_pods (401 without the token); here: nothing else opens it."""
    objs = helm_chart.render_chart()
    (job,) = helm_chart.find(objs, "RayJob")
    head_c = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not any(
        e["name"].startswith("RAY_AUTH") for e in head_c["env"]
    )  # KubeRay's token, not the chart's
    assert "runtimeEnvYAML" not in job["spec"]


# --------------------------------------------------------------------------- serve


def test_serve_pod_answers_readyz_and_detect(images: dict, s3: SeaweedFS, pods: Any, tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    import serving_helpers

    bucket = s3.create_bucket(f"c-{uuid.uuid4().hex[:10]}")
    export = serving_helpers.make_export(tmp_path / "export")
    client = s3.client()
    for path in export.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"export/{path.relative_to(export)}")
    port = free_port()
    values = {
        "prepare": {"enabled": False},
        "images": {"serve": {"repository": IMAGE["serve"].rsplit(":", 1)[0], "tag": TAG}},
        "objectStore": _object_store_values(s3),
        "config": {
            "output": {
                "url": f"s3://{bucket}/out",
                "s3": {"endpoint_url": "${OIOD_S3_ENDPOINT}", "addressing_style": "path"},
            },
            "serve": {"model": f"s3://{bucket}/export"},
        },
        "serve": {"enabled": True, "port": port, "autoscaling": {"enabled": False}, "replicas": 1},
    }
    objs = helm_chart.render_chart(values)
    (dep,) = helm_chart.find(objs, "Deployment", "-serve")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    p = pods(objs)
    name = f"oiod-c-serve-{uuid.uuid4().hex[:6]}"
    start = time.monotonic()
    p.start(pod, c, name, c["command"])
    wait_for(probe_url(c, "startupProbe", SERVE_IP, {}), "serve startup probe", p, name)
    wait_for(probe_url(c, "readinessProbe", SERVE_IP, {}), "serve readiness probe", p, name, timeout=120)
    print(f"\n[containers] serve ready in {time.monotonic() - start:.1f} s")
    image = serving_helpers.blob_image()
    body = json.dumps({"image": "data:image/png;base64," + base64.b64encode(image).decode()}).encode()
    req = urllib.request.Request(
        f"http://{SERVE_IP}:{port}/v1/detect", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.load(r)
    assert r.status == 200 and {d["label"] for d in answer["detections"]} >= {"Car"}, answer
    # The helm test hook's own script, run against the same container, passes too.
    (test_pod,) = [o for o in objs if o["kind"] == "Pod"]
    (tc,) = test_pod["spec"]["containers"]
    proc = p.start(
        test_pod["spec"],
        tc,
        f"{name}-helm-test",
        tc["command"],
        {"OIOD_TEST_URL": f"http://{SERVE_IP}:{port}"},
        detach=False,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ok:"), proc.stdout + proc.stderr[-2000:]


# --------------------------------------------------------------------------- train image (outside CI when not built)


def test_train_evaluate_export_and_tensorboard_in_the_train_image(
    s3: SeaweedFS, pods: Any, tmp_path: Path
) -> None:
    if not image_exists(IMAGE["train"]):
        pytest.skip(f"{IMAGE['train']} not built (make containers-train builds and runs it; ~8 GB, ~7 min)")
    import training_helpers

    bucket = s3.create_bucket(f"c-{uuid.uuid4().hex[:10]}")
    out = training_helpers.build_output(tmp_path / "out", num_images=24)
    client = s3.client()
    for path in out.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"run/{path.relative_to(out)}")
    overrides = dict(o.split("=", 1) for o in training_helpers.tiny_overrides(f"s3://{bucket}/run", steps=4))
    config: dict = {}
    for key, val in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(val)
    config["output"] = {
        "url": f"s3://{bucket}/run",
        "s3": {"endpoint_url": "${OIOD_S3_ENDPOINT}", "addressing_style": "path"},
    }
    config["train"]["model_dir"] = "/models/run/model"
    config["export"] = {"dir": f"s3://{bucket}/run/export"}
    config.setdefault("evaluate", {})["timeout_s"] = 60
    small = {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"cpu": "2", "memory": "3Gi"}}
    values = {
        "prepare": {"enabled": False},
        "images": {"train": {"repository": IMAGE["train"].rsplit(":", 1)[0], "tag": TAG}},
        "objectStore": _object_store_values(s3),
        "config": config,
        "modelStorage": {"enabled": True},
        "train": {"enabled": True, "gpusPerWorker": 0, "resources": small},
        "evaluate": {"enabled": True, "resources": small},
        "export": {"enabled": True, "resources": small},
        "tensorboard": {"enabled": True},
    }
    objs = helm_chart.render_chart(values)
    p = pods(objs)
    timings = {}
    for suffix in ("-train-1", "-evaluate-1", "-export-1"):
        (job,) = helm_chart.find(objs, "Job", suffix)
        pod = job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        start = time.monotonic()
        proc = p.start(
            pod, c, f"oiod-c{suffix}-{uuid.uuid4().hex[:6]}", c["command"], detach=False, timeout=1800
        )
        timings[suffix.strip("-1").strip("-")] = time.monotonic() - start
        assert proc.returncode == 0, (suffix, proc.stdout[-3000:], proc.stderr[-3000:])
    keys = _objects(s3, bucket, "run/")
    assert any(k.startswith("eval/metrics-") for k in keys), sorted(keys)[:20]
    assert "export/saved_model/saved_model.pb" in keys and "export/model.json" in keys
    (tb,) = helm_chart.find(objs, "Deployment", "-tensorboard")
    pod = tb["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    port = free_port()
    argv = [a if a != "6006" else str(port) for a in c["command"]]  # shared host network: move the port
    name = f"oiod-c-tensorboard-{uuid.uuid4().hex[:6]}"
    p.start(pod, c, name, argv)
    wait_for(f"http://127.0.1.9:{port}/", "TensorBoard", p, name, timeout=120)
    print(f"\n[containers] train image: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}")
