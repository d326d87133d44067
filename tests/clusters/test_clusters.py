"""The cluster configurations in clusters/ (see docs/clusters.md), checked offline.

Each Ray cluster launcher YAML goes through the validator inside the pinned Ray (what `ray up` runs before it touches a
cloud), plus the rules that validator leaves out; the KubeRay manifest is checked against the fields a RayCluster
(ray.io/v1) requires. Every check is also shown a broken copy, so that it is known to reject one. Across all files:
the images carry the installed Ray version, MLflow binds 127.0.0.1 and every node reaches it, GPU workers scale from
zero, and nothing looks like a credential.
"""

import copy
import re
import socket
from pathlib import Path

import click
import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
DOCS = ROOT / "docs" / "clusters.md"
LAUNCHERS = ("aws.yaml", "gcp.yaml", "onprem.yaml")
KUBERAY = "kuberay.yaml"
CONFIGS = (*LAUNCHERS, KUBERAY)
MLFLOW_URI = "http://127.0.0.1:5000"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No check here may reach the network. Ray's `prepare_config` only merges the provider's bundled defaults.yaml;
    what calls boto3 or the Google API (key pairs, security groups, the instance types' GPUs) runs later, in `ray up`'s
    bootstrap, which these tests never call."""

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster-config check tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((CLUSTERS / name).read_text()) if doc]


def strings(node) -> list[str]:
    """Every string value in a parsed YAML document, at any depth."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def values_of(node, keys: set[str]) -> list:
    """The values of every mapping entry whose key is in `keys`, at any depth."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys:
                found.append(value)
            found += values_of(value, keys)
    elif isinstance(node, list):
        for value in node:
            found += values_of(value, keys)
    return found


# Ray cluster launcher YAMLs ----------------------------------------------------------------------------------------


def worker_types(prepared: dict) -> dict[str, dict]:
    """The node types that provide workers. The `local` provider has one generated type that is both the head's and
    the workers' (its min/max_workers count the worker hosts)."""
    types = prepared["available_node_types"]
    if prepared["provider"]["type"] == "local":
        return types
    return {name: spec for name, spec in types.items() if name != prepared["head_node_type"]}


def check_launcher(config: dict) -> dict:
    """Ray's validation, then what it does not check; returns the prepared config (defaults filled in).

    `prepare_config` before `validate_config`, as `ray up` does: it merges the provider's defaults and fills in each
    node type's min/max_workers. The validator checks top-level keys, node types and resources (integers only), and
    that the global max_workers covers the sum of min_workers; it accepts a node type whose min_workers exceeds its
    own max_workers, never looks inside node_config (a typo in an EC2 field passes), and accepts a `local` cluster
    with no SSH user."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    for name, spec in worker_types(prepared).items():
        if spec["min_workers"] > spec["max_workers"]:
            raise ValueError(f"node type {name}: min_workers {spec['min_workers']} > max_workers {spec['max_workers']}")
    if prepared["provider"]["type"] == "local" and not prepared["auth"].get("ssh_user"):
        raise ValueError("the local provider reaches its hosts over SSH: auth.ssh_user is required")
    return prepared


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_validator(name):
    prepared = check_launcher(load(name))
    assert worker_types(prepared)


def _set(path: tuple, value):
    def mutate(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _drop(path: tuple):
    def mutate(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _both(*mutations):
    def mutate(config):
        for m in mutations:
            m(config)

    return mutate


BROKEN_LAUNCHERS = [
    # (file, what is broken, mutation, the error it must raise, its message)
    *[
        (name, "unknown top-level key", _set(("head_node_typ",), "head"), jsonschema.ValidationError, "head_node_typ")
        for name in LAUNCHERS
    ],
    *[
        (
            name,
            "min_workers above max_workers",
            _both(
                _set(("available_node_types", "gpu-1x", "min_workers"), 5),
                _set(("available_node_types", "gpu-1x", "max_workers"), 2),
            ),
            ValueError,
            "min_workers 5 > max_workers 2",
        )
        for name in ("aws.yaml", "gcp.yaml")
    ],
    *[
        (
            name,
            "fractional resource",
            _set(("available_node_types", "gpu-1x", "resources"), {"GPU": 0.5}),
            jsonschema.ValidationError,
            "is not of type 'integer'",
        )
        for name in ("aws.yaml", "gcp.yaml")
    ],
    *[
        (name, "no head_node_type", _drop(("head_node_type",)), ValueError, "head_node_type")
        for name in ("aws.yaml", "gcp.yaml")
    ],
    (
        "aws.yaml",
        "misspelt docker key",
        _set(("docker", "worker_imag"), "x"),
        jsonschema.ValidationError,
        "worker_imag",
    ),
    ("onprem.yaml", "no head_ip", _drop(("provider", "head_ip")), click.ClickException, "head_ip"),
    ("onprem.yaml", "no worker_ips", _drop(("provider", "worker_ips")), click.ClickException, "worker_ips"),
    ("onprem.yaml", "no ssh_user", _drop(("auth", "ssh_user")), ValueError, "ssh_user"),
    (
        "onprem.yaml",
        "node types on a local cluster",
        _set(("available_node_types",), {"gpu": {"resources": {}, "node_config": {}}}),
        click.ClickException,
        "available_node_types",
    ),
]


@pytest.mark.parametrize(
    ("name", "mutate", "error", "match"),
    [(name, mutate, error, match) for name, _, mutate, error, match in BROKEN_LAUNCHERS],
    ids=[f"{name}-{what}" for name, what, *_ in BROKEN_LAUNCHERS],
)
def test_broken_launcher_yaml_is_rejected(name, mutate, error, match):
    config = load(name)
    mutate(config)
    with pytest.raises(error, match=re.escape(match)):
        check_launcher(config)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_gpu_workers_scale_from_zero(name):
    """An idle cluster keeps no GPU node (the sweep asks for them first: docs/clusters.md, step 5)."""
    minimums = {type_: spec["min_workers"] for type_, spec in worker_types(check_launcher(load(name))).items()}
    assert set(minimums.values()) == {0}, minimums


@pytest.mark.parametrize("name", LAUNCHERS)
def test_head_exports_the_tracking_uri_to_ray(name):
    """The export must share a shell with `ray start --head`: Ray's processes, the job supervisor among them, inherit
    that environment, and a `ray job submit` driver inherits the supervisor's."""
    commands = load(name)["head_start_ray_commands"]
    assert any(f"export MLFLOW_TRACKING_URI={MLFLOW_URI};" in c and "ray start --head" in c for c in commands)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_workers_relay_mlflow_to_the_head(name):
    """Trials log from the GPU nodes to the driver's URI, 127.0.0.1:5000 on their own node: a relay there leads to
    the head's relay on 5001, which leads to the server."""
    config = load(name)
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "socat TCP-LISTEN:5001,fork,reuseaddr TCP:127.0.0.1:5000" in head
    assert "socat TCP-LISTEN:5000,bind=127.0.0.1,fork,reuseaddr TCP:$RAY_HEAD_IP:5001" in workers
    assert f"export MLFLOW_TRACKING_URI={MLFLOW_URI};" in workers


@pytest.mark.parametrize("name", LAUNCHERS)
def test_project_is_installed_on_every_node(name):
    config = load(name)
    # An export of HEAD, not ".": `ray up` hashes every file of a mounted folder, a checkout's virtualenv included.
    assert config["file_mounts"] == {"~/invalid-pixels-bench": "~/.cache/invalid-pixels-bench-cluster"}
    assert "pip install --quiet -e ~/invalid-pixels-bench" in config["setup_commands"]
    assert any("faiss-gpu" in c for c in config["worker_setup_commands"])


# KubeRay RayCluster --------------------------------------------------------------------------------------------------


def raycluster(documents: list[dict]) -> dict:
    clusters = [doc for doc in documents if doc.get("kind") == "RayCluster"]
    assert len(clusters) == 1, f"expected one RayCluster, found {len(clusters)}"
    return clusters[0]


def _containers(template, where: str) -> list[dict]:
    containers = ((template or {}).get("spec") or {}).get("containers")
    if not containers:
        raise ValueError(f"{where}: template.spec.containers is required")
    for container in containers:
        for field in ("name", "image"):
            if not isinstance(container.get(field), str) or not container[field]:
                raise ValueError(f"{where}: every container needs a {field}")
    return containers


def check_raycluster(doc: dict) -> None:
    """The fields the RayCluster resource (apiVersion ray.io/v1) requires, as KubeRay's CRD defines them, and this
    bench's rules: the Ray version is the pinned one, and every worker group asks for NVIDIA GPUs."""
    if doc.get("apiVersion") != "ray.io/v1":
        raise ValueError(f"apiVersion must be ray.io/v1, not {doc.get('apiVersion')!r}")
    if doc.get("kind") != "RayCluster":
        raise ValueError(f"kind must be RayCluster, not {doc.get('kind')!r}")
    if not (doc.get("metadata") or {}).get("name"):
        raise ValueError("metadata.name is required")
    spec = doc.get("spec") or {}
    if spec.get("rayVersion") != ray.__version__:
        raise ValueError(f"spec.rayVersion {spec.get('rayVersion')!r} is not the installed Ray {ray.__version__}")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        raise ValueError("spec.headGroupSpec is required")
    # Optional since KubeRay 1.3, required by older operators' ray.io/v1 CRD: always given.
    if not isinstance(head.get("rayStartParams"), dict):
        raise ValueError("headGroupSpec.rayStartParams is required")
    _containers(head.get("template"), "headGroupSpec")
    groups = spec.get("workerGroupSpecs")
    if not groups:
        raise ValueError("spec.workerGroupSpecs: the bench needs GPU workers")
    for group in groups:
        name = group.get("groupName")
        if not isinstance(name, str) or not name:
            raise ValueError("every workerGroupSpecs entry needs a groupName")
        if not isinstance(group.get("rayStartParams"), dict):
            raise ValueError(f"worker group {name}: rayStartParams is required")
        counts = {field: group.get(field) for field in ("replicas", "minReplicas", "maxReplicas")}
        for field, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"worker group {name}: {field} must be a non-negative integer, not {value!r}")
        if not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
            raise ValueError(f"worker group {name}: needs minReplicas <= replicas <= maxReplicas, got {counts}")
        limits = [(c.get("resources") or {}).get("limits") or {} for c in _containers(group.get("template"), name)]
        if not any(int(limit.get("nvidia.com/gpu", 0)) > 0 for limit in limits):
            raise ValueError(f"worker group {name}: no container asks for nvidia.com/gpu in resources.limits")


def test_kuberay_manifest_is_a_valid_raycluster():
    documents = load_all(KUBERAY)
    check_raycluster(raycluster(documents))
    assert {doc["kind"] for doc in documents} == {"ServiceAccount", "PersistentVolumeClaim", "RayCluster"}


def _group(doc: dict) -> dict:
    return doc["spec"]["workerGroupSpecs"][0]


def _worker_limits(doc: dict) -> dict:
    return _group(doc)["template"]["spec"]["containers"][0]["resources"]["limits"]


BROKEN_RAYCLUSTERS = [
    ("no headGroupSpec", lambda doc: doc["spec"].pop("headGroupSpec"), "headGroupSpec is required"),
    ("old apiVersion", lambda doc: doc.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    ("no name", lambda doc: doc["metadata"].pop("name"), "metadata.name"),
    ("other Ray", lambda doc: doc["spec"].update(rayVersion="2.59.0"), "rayVersion"),
    ("no head rayStartParams", lambda doc: doc["spec"]["headGroupSpec"].pop("rayStartParams"), "rayStartParams"),
    (
        "head container without image",
        lambda doc: doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
        "needs a image",
    ),
    ("no worker groups", lambda doc: doc["spec"].pop("workerGroupSpecs"), "workerGroupSpecs"),
    ("no groupName", lambda doc: _group(doc).pop("groupName"), "groupName"),
    ("minReplicas above maxReplicas", lambda doc: _group(doc).update(minReplicas=3, maxReplicas=2), "minReplicas"),
    ("replicas above maxReplicas", lambda doc: _group(doc).update(replicas=9), "replicas <= maxReplicas"),
    ("no maxReplicas", lambda doc: _group(doc).pop("maxReplicas"), "maxReplicas must be"),
    ("no nvidia.com/gpu", lambda doc: _worker_limits(doc).pop("nvidia.com/gpu"), "nvidia.com/gpu"),
]


@pytest.mark.parametrize(
    ("mutate", "match"), [b[1:] for b in BROKEN_RAYCLUSTERS], ids=[b[0] for b in BROKEN_RAYCLUSTERS]
)
def test_broken_raycluster_is_rejected(mutate, match):
    doc = copy.deepcopy(raycluster(load_all(KUBERAY)))
    mutate(doc)
    with pytest.raises(ValueError, match=re.escape(match)):
        check_raycluster(doc)


def test_kuberay_gpu_groups_scale_from_zero():
    groups = raycluster(load_all(KUBERAY))["spec"]["workerGroupSpecs"]
    assert [(g["minReplicas"], g["replicas"]) for g in groups] == [(0, 0)] * len(groups)


def test_kuberay_pods_reach_mlflow_on_the_head():
    spec = raycluster(load_all(KUBERAY))["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "MLFLOW_TRACKING_URI", "value": MLFLOW_URI} in head["env"]
    assert {"containerPort": 5001, "name": "mlflow-relay"} in head["ports"]
    assert "socat TCP-LISTEN:5001,fork,reuseaddr TCP:127.0.0.1:5000" in " ".join(head["args"])
    for group in spec["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        assert {"name": "MLFLOW_TRACKING_URI", "value": MLFLOW_URI} in worker["env"]
        assert "socat TCP-LISTEN:5000,bind=127.0.0.1,fork,reuseaddr TCP:$FQ_RAY_IP:5001" in " ".join(worker["args"])


# Every file ----------------------------------------------------------------------------------------------------------


def image_tags(name: str) -> list[str]:
    images = [v for doc in load_all(name) for v in values_of(doc, {"image", "head_image", "worker_image"})]
    return [image.rsplit(":", 1)[1] for image in images]


@pytest.mark.parametrize("name", CONFIGS)
def test_images_carry_the_pinned_ray(name):
    """A Ray upgrade that leaves the images behind fails here: the images' Ray must be the one installed."""
    tags = image_tags(name)
    assert tags
    assert all(tag.startswith(f"{ray.__version__}-py311") for tag in tags), tags


def test_docs_build_the_image_on_the_pinned_ray():
    tags = re.findall(r"(?:rayproject/ray|invalid-pixels-bench):([\w.\-*]+)", DOCS.read_text())
    assert tags
    assert all(tag.startswith(f"{ray.__version__}-py311") for tag in tags), tags


def test_a_stale_image_tag_is_caught(tmp_path, monkeypatch):
    stale = (CLUSTERS / "aws.yaml").read_text().replace(f"ray:{ray.__version__}-", "ray:2.59.0-")
    (tmp_path / "aws.yaml").write_text(stale)
    monkeypatch.setattr(f"{__name__}.CLUSTERS", tmp_path)
    with pytest.raises(AssertionError):
        test_images_carry_the_pinned_ray("aws.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_mlflow_server_binds_loopback_only(name):
    commands = [s for doc in load_all(name) for s in strings(doc) if "mlflow server" in s]
    assert len(commands) == 1
    assert re.findall(r"--host[ =](\S+)", commands[0]) == ["127.0.0.1"]
    assert "--port 5000" in commands[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_storage_to_pass_is_stated(name):
    assert "--storage " in (CLUSTERS / name).read_text()


CREDENTIALS = [
    (r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", "an AWS access key id"),
    (r"aws_secret_access_key|aws_session_token", "an AWS secret key setting"),
    (r"password", "a password"),
    (r"-----BEGIN [A-Z ]*PRIVATE KEY-----", "a private key"),
    (r"\"private_key\"\s*:", "a service account key"),
]


@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTERS.iterdir()))
def test_no_credentials_in_cluster_files(name):
    text = (CLUSTERS / name).read_text()
    found = [what for pattern, what in CREDENTIALS if re.search(pattern, text, re.IGNORECASE)]
    assert not found, f"clusters/{name} holds what looks like {', '.join(found)}"


def test_no_keys_in_the_docs():
    """The guide may say "password" (where one belongs instead); it must not hold a key."""
    text = DOCS.read_text()
    found = [what for pattern, what in CREDENTIALS if what != "a password" and re.search(pattern, text, re.IGNORECASE)]
    assert not found, f"docs/clusters.md holds what looks like {', '.join(found)}"


def test_credential_patterns_bite():
    planted = "key: AKIA" + "ABCDEFGHIJKLMNOP\naws_secret_access_key = x\npassword: hunter2\n"
    assert all(re.search(pattern, planted, re.IGNORECASE) for pattern, _ in CREDENTIALS[:3])
