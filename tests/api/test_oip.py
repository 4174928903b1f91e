"""The Open Inference Protocol (KServe v2 / Triton) over REST (issue 29), against a real ``thali serve``
with a foreign client, ``tritonclient.http``: server and model metadata, readiness, inference with
BYTES (encoded photos) and FP32 (prepared) inputs with binary data on and off, the classification
extension; the answers equal ``/v1``'s for the same photos; bad inputs get a 4xx and the server keeps
answering."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from api_support import Server, jpeg, start_server, stop_server

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the importorskip


@pytest.fixture(scope="module")
def oip_server(api_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("oip")
    running = start_server(
        api_registry, folder / "serve.log", {"THALI_CACHE": str(folder / "cache")}, "--domain", "tiny"
    )
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture
def client(oip_server: Server) -> Any:
    return httpclient.InferenceServerClient(url=oip_server.url.removeprefix("http://"), network_timeout=60)


PHOTOS = [jpeg(colour, seed=s) for s, colour in enumerate(("red", "green", "blue", "red"))]


def v1_answers(server: Server) -> list[dict[str, Any]]:
    return [
        server.post("/v1/domains/tiny/predict", files={"image": ("p.jpg", p)}, params={"top_k": 3}).json()
        for p in PHOTOS
    ]


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "thali" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "input": "FP32"}
    assert next(i for i in meta["inputs"] if i["name"] == "input")["shape"] == [-1, 3, 32, 32]
    assert {"logits", "probabilities", "unknown", "unknown_score"} <= {o["name"] for o in meta["outputs"]}
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert client.get_model_metadata("tiny", "1")["versions"] == ["1"]
    assert not client.is_model_ready("tiny", "7") and not client.is_model_ready("nope")


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_input_answers_like_v1(client: Any, oip_server: Server, binary: bool) -> None:
    image = httpclient.InferInput("image", [len(PHOTOS)], "BYTES")
    values = PHOTOS if binary else [base64.b64encode(p) for p in PHOTOS]  # JSON BYTES: base64 strings
    image.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary)
        for name in ("probabilities", "unknown", "unknown_score", "logits")
    ]
    result = client.infer("tiny", [image], outputs=outputs)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(PHOTOS), 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    for row, flag, score, v1 in zip(
        probabilities,
        result.as_numpy("unknown"),
        result.as_numpy("unknown_score"),
        v1_answers(oip_server),
        strict=True,
    ):
        top = v1["predictions"][0]
        assert int(row.argmax()) == top["class_id"]
        assert abs(float(row.max()) - top["probability"]) < 1e-5
        assert bool(flag) == v1["unknown"] and abs(float(score) - v1["unknown_score"]) < 1e-4
    assert result.get_response()["model_version"] == "1"


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_input_and_the_classification_extension(client: Any, oip_server: Server, binary: bool) -> None:
    from thali.core.inference import Preprocessor

    meta = oip_server.get("/v1/domains/tiny/card").json()
    assert meta["classes"]
    preprocess = json.loads(
        next(Path(oip_server.registry).glob("tiny/versions/1/preprocess.json")).read_text()  # type: ignore[arg-type]
    )
    batch = np.stack([Preprocessor(preprocess)(p) for p in PHOTOS]).astype(np.float32)
    tensor = httpclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)]
    result = client.infer("tiny", [tensor], outputs=outputs, model_version="1")
    top2 = result.as_numpy("probabilities")
    assert top2.shape == (len(PHOTOS), 2)
    for row, v1 in zip(top2, v1_answers(oip_server), strict=True):
        score, index, label = (row[0].decode() if isinstance(row[0], bytes) else row[0]).split(":")
        assert label == v1["predictions"][0]["label"] and int(index) == v1["predictions"][0]["class_id"]
        assert abs(float(score) - v1["predictions"][0]["probability"]) < 1e-5


def test_bad_inputs_are_4xx_and_the_server_keeps_answering(client: Any, oip_server: Server) -> None:
    url = oip_server.url + "/v2/models/tiny/infer"

    def error(body: Any, status: int, **kwargs: Any) -> str:
        response = requests.post(url, json=body, timeout=30, **kwargs) if body is not None else None
        assert response is not None and response.status_code == status, (response.status_code, response.text)
        assert set(response.json()) == {"error"}, response.text
        return response.json()["error"]

    photo = base64.b64encode(PHOTOS[0]).decode()
    assert "shape" in error(
        {"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]}, 400
    )
    assert "datatype" in error(
        {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "INT64", "data": [0] * 3072}]}, 400
    )
    assert "datatype" in error(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [photo]}]}, 400
    )
    assert "base64" in error(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}, 400
    )
    not_image = base64.b64encode(b"these bytes are not a photo").decode()
    assert "image" in error(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [not_image]}]}, 415
    )
    assert "2 elements" in error(
        {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [photo]}]}, 400
    )
    assert "inputs" in error({"outputs": []}, 400)
    response = requests.post(oip_server.url + "/v2/models/nope/infer", json={"inputs": []}, timeout=30)
    assert response.status_code == 404 and "error" in response.json()
    response = requests.post(
        oip_server.url + "/v2/models/tiny/versions/9/infer", json={"inputs": []}, timeout=30
    )
    assert response.status_code == 404 and "version" in response.json()["error"]
    response = requests.post(
        url,
        data=json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": 99},
                    }
                ]
            }
        ).encode(),
        headers={"Inference-Header-Content-Length": "9999", "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert response.status_code == 400 and "error" in response.json()
    with pytest.raises(InferenceServerException):
        bad = httpclient.InferInput("input", [1, 3, 32, 31], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 32, 31), np.float32))
        client.infer("tiny", [bad])
    # and it still answers
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([PHOTOS[0]], dtype=np.object_))
    assert client.infer("tiny", [image]).as_numpy("probabilities").shape == (1, 3)


# --- gRPC ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_client(api_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Server]]:
    """``thali serve --grpc-port`` (the REST server and the gRPC one in one process) and a client."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from api_support import free_port

    folder = tmp_path_factory.mktemp("oip_grpc")
    port = free_port()
    running = start_server(
        api_registry, folder / "serve.log", {"THALI_CACHE": str(folder / "cache")},
        "--domain", "tiny", "--grpc-port", str(port),
    )  # fmt: skip
    try:
        yield grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}"), running
    finally:
        stop_server(running)


def test_grpc_metadata_readiness_and_answers_like_v1(grpc_client: tuple[Any, Server]) -> None:
    import tritonclient.grpc as grpcclient

    client, server = grpc_client
    assert client.is_server_live() and client.is_server_ready()
    assert "classification" in client.get_server_metadata(as_json=True)["extensions"]
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["versions"] == ["1"] and {i["name"] for i in meta["inputs"]} == {"image", "input"}
    assert client.is_model_ready("tiny") and not client.is_model_ready("tiny", "5")
    image = grpcclient.InferInput("image", [len(PHOTOS)], "BYTES")
    image.set_data_from_numpy(np.array(PHOTOS, dtype=np.object_))
    outputs = [
        grpcclient.InferRequestedOutput("probabilities"),
        grpcclient.InferRequestedOutput("unknown"),
        grpcclient.InferRequestedOutput("logits", class_count=1),
    ]
    result = client.infer("tiny", [image], outputs=outputs)
    probabilities, flags = result.as_numpy("probabilities"), result.as_numpy("unknown")
    top1 = result.as_numpy("logits")
    for row, flag, best, v1 in zip(probabilities, flags, top1, v1_answers(server), strict=True):
        top = v1["predictions"][0]
        assert int(row.argmax()) == top["class_id"] and abs(float(row.max()) - top["probability"]) < 1e-5
        assert bool(flag) == v1["unknown"]
        assert best[0].decode().endswith(f":{top['class_id']}:{top['label']}")
    # a prepared FP32 batch over gRPC gives the same probabilities
    from thali.core.inference import Preprocessor

    preprocess = json.loads(next(Path(server.registry).glob("tiny/versions/1/preprocess.json")).read_text())
    batch = np.stack([Preprocessor(preprocess)(p) for p in PHOTOS]).astype(np.float32)
    tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    prepared = client.infer("tiny", [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    assert np.allclose(prepared.as_numpy("probabilities"), probabilities, atol=1e-5)
    with pytest.raises(InferenceServerException, match="shape"):
        bad = grpcclient.InferInput("input", [1, 3, 8, 8], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
        client.infer("tiny", [bad])
    with pytest.raises(InferenceServerException, match=r"not loaded|version"):
        client.infer("tiny", [image], model_version="9")
    with pytest.raises(InferenceServerException):
        junk = grpcclient.InferInput("image", [1], "BYTES")
        junk.set_data_from_numpy(np.array([b"not a photo at all"], dtype=np.object_))
        client.infer("tiny", [junk])
    assert client.infer("tiny", [image]).as_numpy("probabilities").shape == (len(PHOTOS), 3)


# --- the kserve SDK -----------------------------------------------------------------------------------


KSERVE_CLIENT = """
import asyncio, base64, json, sys
import kserve

url, photos = sys.argv[1], [base64.b64encode(open(p, "rb").read()).decode() for p in sys.argv[2:]]

async def ask():
    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0, timeout=60))
    try:
        states = [await client.is_server_live(url), await client.is_server_ready(url),
                  await client.is_model_ready(url, "tiny")]
        inputs = [kserve.InferInput(name="image", shape=[len(photos)], datatype="BYTES", data=photos)]
        response = await client.infer(url, kserve.InferRequest(model_name="tiny", infer_inputs=inputs),
                                      model_name="tiny")
        return states, {o.name: list(o.data) for o in response.outputs}
    finally:
        await client.close()

states, outputs = asyncio.run(ask())
print(json.dumps({"states": states, "outputs": outputs}, default=float))
"""


def test_the_kserve_sdk_rest_client_answers_like_v1(oip_server: Server, tmp_path: Path) -> None:
    """KServe's own v2 REST client (``kserve.InferenceRESTClient``, httpx): liveness, readiness and
    inference with base64 BYTES photos give /v1's answers. In a process of its own: the kserve SDK and
    tritonclient.grpc both register the protocol's ``inference.*`` protobuf messages, which one process
    cannot hold twice."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("kserve") is None:  # not imported here: see above
        pytest.skip("the kserve SDK is in the dev extra")
    paths = []
    for i, photo in enumerate(PHOTOS):
        path = tmp_path / f"p{i}.jpg"
        path.write_bytes(photo)
        paths.append(str(path))
    result = subprocess.run(
        [sys.executable, "-c", KSERVE_CLIENT, oip_server.url, *paths],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["states"] == [True, True, True]
    probabilities = np.asarray(answer["outputs"]["probabilities"], dtype=np.float32).reshape(len(PHOTOS), 3)
    for row, flag, v1 in zip(
        probabilities, answer["outputs"]["unknown"], v1_answers(oip_server), strict=True
    ):
        top = v1["predictions"][0]
        assert int(row.argmax()) == top["class_id"] and abs(float(row.max()) - top["probability"]) < 1e-5
        assert bool(flag) == v1["unknown"]
