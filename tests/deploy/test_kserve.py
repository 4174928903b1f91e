"""deploy/kserve/ checked offline (issue 29): no KServe CRD schema is available without a cluster or the
network, so every field of the ServingRuntime and the InferenceService is checked against the API types
the kserve SDK is generated from (``kserve.models``, and ``kubernetes.client.models`` for the core
types inside): each key a field of its type, each value of the field's type, all the way down. The
check runs in a process of its own: importing kserve registers the protocol's ``inference.*``
protobuf messages, which tritonclient.grpc (the gRPC tests) registers too, and one process cannot
hold both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO / "deploy" / "kserve"
TOP = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}


def problems(value: Any, type_name: str, where: str) -> list[str]:
    """What in ``value`` is not of the SDK type ``type_name``."""
    import kserve.models as ks
    import kubernetes.client.models as k8s

    type_name = type_name.strip()
    if type_name.startswith(("list[", "List[")):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, item in enumerate(value) for p in problems(item, type_name[5:-1], f"{where}[{i}]")]
    if type_name.startswith(("dict(", "Dict[")):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        return [p for k, v in value.items() for p in problems(v, inner, f"{where}.{k}")]
    plain = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in plain:
        ok = isinstance(value, plain[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
    if type_name in ("object", "datetime"):
        return []
    cls = getattr(ks, type_name, None) or getattr(k8s, type_name, None)
    assert cls is not None, f"{where}: no SDK type {type_name}"
    if not isinstance(value, dict):
        return [f"{where}: expected an object ({type_name})"]
    fields = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    found = []
    for key, item in value.items():
        if key not in fields:
            found.append(f"{where}.{key}: not a field of {type_name}")
        else:
            found += problems(item, cls.openapi_types[fields[key]], f"{where}.{key}")
    return found


def manifests() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted(KSERVE.glob("*.yaml"))]


def checked(documents: list[dict[str, Any]]) -> list[list[str]]:
    """:func:`problems` of each document, found in a fresh Python process (see the module's note)."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the kserve SDK is in the dev extra")
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from test_kserve import problems, TOP; "
        "docs = json.loads(sys.stdin.read()); "
        "print(json.dumps([problems(d, TOP[d['kind']], d['kind']) for d in docs]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)],
        input=json.dumps(documents),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_kserve_manifests_use_only_fields_of_their_api_types() -> None:
    found = manifests()
    assert {m["kind"] for m in found} == set(TOP)
    assert checked(found) == [[] for _ in found]
    runtime = next(m for m in found if m["kind"] == "ServingRuntime")
    service = next(m for m in found if m["kind"] == "InferenceService")
    assert "v2" in runtime["spec"]["protocolVersions"]
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    container = runtime["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "--grpc-port" in container["args"] and "--watch" in container["args"]


def test_the_check_catches_a_misspelt_or_mistyped_field() -> None:
    service = next(m for m in manifests() if m["kind"] == "InferenceService")
    service["spec"]["predictor"]["model"]["protocolVersoin"] = "v2"
    service["spec"]["predictor"]["minReplicas"] = "one"
    (found,) = checked([service])
    assert any("protocolVersoin: not a field of V1beta1ModelSpec" in p for p in found), found
    assert any("minReplicas: expected int" in p for p in found), found
