"""The Kubernetes manifests in infra/deploy: every object validates against the Kubernetes API schema
(kubernetes-validate, offline, strict: an unknown field is an error), images are pinned (no `latest`, the
Flywheel image at the project's version), and the serving pod's two containers agree on where the
adapters are (the gateway downloads them where vLLM loads them from)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "infra" / "deploy"
K8S_VERSION = "1.33.0"


def _objects() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", doc) for p in sorted(DEPLOY.glob("*.yaml"))
            for i, doc in enumerate(yaml.safe_load_all(p.read_text())) if doc]


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else spec
    return pod.get("containers", [])


@pytest.mark.parametrize(("where", "doc"), _objects(), ids=[w for w, _ in _objects()])
def test_manifest_validates_against_the_kubernetes_schema(where: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    """The check is not vacuous: a misspelt field and a wrong type both fail."""
    doc = next(d for w, d in _objects() if d["kind"] == "Deployment")
    bad = {**doc, "spec": {**doc["spec"], "replicaz": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**doc, "spec": {**doc["spec"], "replicas": "two"}}, K8S_VERSION, strict=True)


def test_images_are_pinned_and_flywheel_is_at_the_project_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = [c["image"] for _, doc in _objects() for c in _containers(doc)]
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image
        if name == "flywheel":
            assert tag == version, f"{image}: the Flywheel image must be tagged with the project version {version}"


def test_gateway_downloads_adapters_where_vllm_loads_them() -> None:
    pod = next(d for _, d in _objects() if d["kind"] == "Deployment" and d["metadata"]["name"] == "flywheel-serving")
    containers = {c["name"]: c for c in _containers(pod)}
    command = containers["gateway"]["command"]
    args = dict(a.split("=", 1) for a in command if "=" in a and not a.startswith("-"))
    assert args.get("backend") == "vllm"
    local = args.get("registry.adapters_dir")
    remote = args.get("vllm.adapters_root") or local  # "" = vLLM sees the same paths
    assert local, "the gateway must download adapters into a shared volume (registry.adapters_dir=...)"

    def volume_at(container: dict, path: str) -> str | None:
        for m in container.get("volumeMounts", []):
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
                return m["name"]
        return None

    shared = volume_at(containers["gateway"], local)
    assert shared is not None and shared == volume_at(containers["vllm"], remote), (local, remote)


def test_cpu_and_gpu_locks_pin_the_matching_torch_builds() -> None:
    """make setup installs the CPU lock; the GPU images install their own, with PyPI's CUDA build."""
    def torch_line(name: str) -> str:
        return next(ln for ln in (REPO / "infra" / name).read_text().splitlines() if ln.startswith("torch=="))

    assert torch_line("requirements.lock").split()[0].endswith("+cpu")
    gpu = (REPO / "infra" / "requirements-gpu.lock").read_text()
    assert "+cpu" not in torch_line("requirements-gpu.lock") and "\nnvidia-" in gpu
    assert gpu.count("--hash=sha256:") > 100  # hashed like the CPU lock

