"""deploy/ray/rayjob.yaml (issue 30): no KubeRay CRD schema is available offline, so this checks what can
be checked here: the YAML parses, the job runs `thali predict --engine ray` into the shared volume, and
the pod templates are valid Kubernetes PodSpecs (kubernetes-validate, as deploy/k8s/ is checked)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

JOB = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "rayjob.yaml"


def test_the_rayjob_runs_thali_predict_on_ray_with_valid_pod_templates() -> None:
    job = yaml.safe_load(JOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["thali", "predict"] and entry[entry.index("--engine") + 1] == "ray"
    out = entry[entry.index("--out") + 1]
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for template in templates:
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        assert any(out.startswith(m["mountPath"] + "/") for m in mounts), "the output is on the shared volume"
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    for i, template in enumerate(templates):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"t{i}"}, "spec": template["spec"]}
        validate.validate(pod, "1.30", strict=True)
