"""The Open Inference Protocol (KServe "v2", Triton's HTTP API) over REST, beside ``/v1``: the clients
teams already have (``tritonclient``, the ``kserve`` SDK, gateways, load tools) talk to thali unchanged.

A *model* is a domain, its *version* the registry version being served. Inputs: ``image`` (``BYTES``,
shape ``[N]``: encoded image files, prepared by the package's own preprocessing within the image limits)
or ``input`` (``FP32``, shape ``[N, 3, H, W]``, already prepared as the metadata says). Outputs:
``logits``, ``probabilities`` (calibrated), ``unknown`` (``BOOL``), ``unknown_score`` and, when asked and
the model gives them, ``features``. Extensions: *classification* (``"parameters": {"classification": k}``
on an output gives ``"score:index:label"`` strings) and *binary tensor data* (Triton's
``binary_data`` / ``binary_data_size`` / ``Inference-Header-Content-Length``, what ``tritonclient``
sends by default). JSON ``BYTES`` elements are base64 strings. Errors are ``{"error": "..."}`` with a 4xx,
as the protocol says; the limits (bytes, images, pixels) are those of ``/v1``.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

import numpy as np
from flask import Response, request
from flask.views import MethodView
from flask_smorest import Blueprint

from thali.core import __version__
from thali.core.errors import DataError
from thali.core.export import FEATURES, LOGITS, STAGE_FEATURES
from thali.core.inference.postprocess import predictions, softmax

from .bodies import loads
from .errors import ApiError
from .hosting import LoadedModel
from .service import service

blp = Blueprint("oip", __name__, url_prefix="/v2", description="Open Inference Protocol (KServe v2) REST")
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["classification", "binary_tensor_data"]
DTYPES = {
    "FP32": "<f4",
    "FP16": "<f2",
    "FP64": "<f8",
    "INT64": "<i8",
    "INT32": "<i4",
    "UINT8": "u1",
    "BOOL": "?",
}
DEFAULT_OUTPUTS = ("logits", "probabilities", "unknown", "unknown_score")
MAX_JSON_BYTES = 64 * 1024 * 1024


def _bad(message: str, status: int = 400) -> ApiError:
    return ApiError(status, "bad_request" if status == 400 else "not_found", message)


def _json(data: dict[str, Any]) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), mimetype="application/json")


# -- health and metadata ------------------------------------------------------------------------------


@blp.route("/health/live")
class Live(MethodView):
    @blp.response(200, description="the server is live")
    def get(self) -> Response:
        """Server liveness (OIP): 200 while the process answers"""
        return _json({"live": True})


@blp.route("/health/ready")
class Ready(MethodView):
    @blp.response(200, description="every configured domain is loaded")
    @blp.alt_response(400, description="not ready: a configured domain is not loaded")
    def get(self) -> Response:
        """Server readiness (OIP): 200 when every configured domain is served, else 400"""
        hosting = service().hosting
        ready = bool(hosting.models) and not hosting.failures
        response = _json({"ready": ready})
        response.status_code = 200 if ready else 400
        return response


@blp.route("")
class ServerMetadata(MethodView):
    @blp.response(200, description="name, version and extensions")
    def get(self) -> Response:
        """Server metadata (OIP)"""
        return _json({"name": "thali", "version": __version__, "extensions": EXTENSIONS})


def _model(name: str, version: str | None) -> LoadedModel:
    hosting = service().hosting
    try:
        model = hosting.get(name)
    except ApiError as exc:
        raise _bad(exc.message, exc.http_status) from None
    except DataError as exc:
        raise _bad(exc.message, 404) from None
    if version is not None and version != str(model.version):
        raise _bad(f"{name}: version {version[:20]!r} is not loaded (loaded: {model.version})", 404)
    return model


def _shape_of(model: LoadedModel) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in model.package.preprocess["input_size"])
    return c, h, w


def _metadata(model: LoadedModel) -> dict[str, Any]:
    c, h, w = _shape_of(model)
    classes = len(model.labels.get("classes", []))
    outputs = [
        {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
        {"name": "unknown", "datatype": "BOOL", "shape": [-1]},
        {"name": "unknown_score", "datatype": "FP32", "shape": [-1]},
    ]
    if FEATURES in model.backend.capabilities:
        outputs.append({"name": "features", "datatype": "FP32", "shape": [-1, -1]})
    return {
        "name": model.domain,
        "versions": [str(model.version)],
        "platform": f"thali_{model.backend_name}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]},
        ],
        "outputs": outputs,
    }


@blp.route("/models/<name:model>")
class ModelMetadata(MethodView):
    @blp.response(200, description="the model's inputs and outputs")
    @blp.alt_response(404, description="no such model")
    def get(self, model: str) -> Response:
        """Model metadata (OIP): a model is a domain; the served version"""
        return _json(_metadata(_model(model, None)))


@blp.route("/models/<name:model>/versions/<string:version>")
class VersionMetadata(MethodView):
    @blp.response(200, description="the model's inputs and outputs")
    @blp.alt_response(404, description="no such model, or not that version")
    def get(self, model: str, version: str) -> Response:
        """Model metadata of a version (OIP): the loaded version, else 404"""
        return _json(_metadata(_model(model, version)))


def _ready(model: str, version: str | None) -> Response:
    found = _model(model, version)
    return _json({"name": found.domain, "ready": True})


@blp.route("/models/<name:model>/ready")
class ModelReady(MethodView):
    @blp.response(200, description="the model is loaded")
    @blp.alt_response(404, description="no such model")
    def get(self, model: str) -> Response:
        """Model readiness (OIP)"""
        return _ready(model, None)


@blp.route("/models/<name:model>/versions/<string:version>/ready")
class VersionReady(MethodView):
    @blp.response(200, description="that version is loaded")
    @blp.alt_response(404, description="no such model, or not that version")
    def get(self, model: str, version: str) -> Response:
        """Model readiness of a version (OIP)"""
        return _ready(model, version)


# -- inference ----------------------------------------------------------------------------------------


def _body() -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary tail of an inference request."""
    raw = request.get_data(cache=False)
    length = request.headers.get(HEADER_LENGTH)
    if length is not None:
        if not length.isdigit() or int(length) > len(raw):
            raise _bad(f"{HEADER_LENGTH} {length[:20]!r} is not a length within the body ({len(raw)} bytes)")
        head, tail = raw[: int(length)], memoryview(raw)[int(length) :]
    else:
        head, tail = raw, memoryview(b"")
    try:
        data = loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the request is not JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), list) or not data["inputs"]:
        raise _bad("the request needs 'inputs': a list of tensors")
    return data, tail


def _shape(tensor: dict[str, Any], name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(v) is int and v >= 0 for v in shape) or len(shape) > 8:
        raise _bad(f"input {name!r}: shape must be a list of non-negative integers")
    return shape


def _binary(
    tensor: dict[str, Any], tail: memoryview, offset: int, name: str
) -> tuple[memoryview | None, int]:
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict) or "binary_data_size" not in params:
        return None, offset
    size = params["binary_data_size"]
    if type(size) is not int or size < 0 or offset + size > len(tail):
        raise _bad(f"input {name!r}: binary_data_size {size!r} does not fit the binary data sent")
    return tail[offset : offset + size], offset + size


def _images(tensor: dict[str, Any], raw: memoryview | None, count: int) -> list[bytes]:
    """``BYTES`` elements: length-prefixed in binary, base64 strings in JSON."""
    limit = service().settings.max_upload_bytes
    images: list[bytes] = []
    if raw is not None:
        pos = 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise _bad("input 'image': a BYTES element's 4-byte length is cut off")
            (size,) = struct.unpack_from("<I", raw, pos)
            if size > limit:
                raise ApiError(
                    413, "payload_too_large", f"image {len(images)} is over the limit of {limit:,} bytes"
                )
            if pos + 4 + size > len(raw):
                raise _bad("input 'image': a BYTES element is longer than the data sent")
            images.append(bytes(raw[pos + 4 : pos + 4 + size]))
            pos += 4 + size
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not all(isinstance(v, str | bytes) for v in data):
            raise _bad("input 'image': data must be a list of base64 strings (or binary data)")
        for text in data:
            if isinstance(text, bytes):  # gRPC's bytes_contents: the files themselves
                if len(text) > limit:
                    raise ApiError(
                        413, "payload_too_large", f"image {len(images)} is over the limit of {limit:,} bytes"
                    )
                images.append(text)
                continue
            if len(text) // 4 * 3 > limit + 3:
                raise ApiError(
                    413, "payload_too_large", f"image {len(images)} is over the limit of {limit:,} bytes"
                )
            try:
                images.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise _bad(f"input 'image': element {len(images)} is not base64") from None
    if len(images) != count:
        raise _bad(f"input 'image': shape says {count} elements, the data holds {len(images)}")
    return images


def _tensor_input(model: LoadedModel, tensor: dict[str, Any], raw: memoryview | None) -> np.ndarray:
    c, h, w = _shape_of(model)
    shape = _shape(tensor, "input")
    if len(shape) != 4 or shape[1:] != [c, h, w]:
        raise _bad(f"input 'input': shape {shape} is not [N, {c}, {h}, {w}]")
    if tensor.get("datatype") != "FP32":
        raise _bad(f"input 'input': datatype {str(tensor.get('datatype'))[:20]!r} is not FP32")
    if shape[0] > service().settings.max_batch_images:
        raise ApiError(
            413, "payload_too_large", f"{shape[0]} images; the limit is {service().settings.max_batch_images}"
        )
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != 4 * count:
            raise _bad(f"input 'input': {len(raw)} bytes of binary data for {count} FP32 values")
        values = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            values = np.asarray(tensor.get("data"), dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise _bad("input 'input': data must be a list of numbers") from None
        if values.size != count:
            raise _bad(f"input 'input': shape holds {count} values, the data {values.size}")
    values = values.reshape(shape).astype(np.float32)
    if not np.isfinite(values).all():
        raise _bad("input 'input': holds values that are not finite")
    return values


def _inputs(model: LoadedModel, data: dict[str, Any], tail: memoryview) -> np.ndarray:
    """The request's one input as the model's batch (N, 3, H, W)."""
    if len(data["inputs"]) != 1:
        raise _bad("send exactly one input: 'image' (BYTES) or 'input' (FP32)")
    tensor = data["inputs"][0]
    if not isinstance(tensor, dict):
        raise _bad("an input must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    raw, used = _binary(tensor, tail, 0, str(name))
    if used != len(tail):
        raise _bad(f"{len(tail) - used} bytes of binary data that no input claims")
    if name == "input":
        return _tensor_input(model, tensor, raw)
    if name != "image":
        raise _bad(f"no input {str(name)[:40]!r}: this model takes 'image' (BYTES) or 'input' (FP32)")
    if tensor.get("datatype") != "BYTES":
        raise _bad(f"input 'image': datatype {str(tensor.get('datatype'))[:20]!r} is not BYTES")
    shape = _shape(tensor, "image")
    if len(shape) != 1:
        raise _bad(f"input 'image': shape {shape} is not [N]")
    if shape[0] > service().settings.max_batch_images or shape[0] < 1:
        raise ApiError(
            413, "payload_too_large", f"{shape[0]} images; the limit is {service().settings.max_batch_images}"
        )
    images = _images(tensor, raw, shape[0])
    try:
        return np.stack([model.preprocessor(image) for image in images])
    except DataError as exc:
        raise ApiError(exc.http_status, exc.code, exc.message) from None


def _wanted(model: LoadedModel, data: dict[str, Any]) -> list[dict[str, Any]]:
    asked = data.get("outputs")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("'parameters' must be an object")
    binary = bool(parameters.get("binary_data_output", False))
    if asked is None:
        return [{"name": n, "parameters": {"binary_data": binary}} for n in DEFAULT_OUTPUTS]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise _bad("'outputs' must be a list of objects with a name")
    names = {o["name"] for o in _metadata(model)["outputs"]}
    for output in asked:
        if not isinstance(output.get("name"), str) or output["name"] not in names:
            raise _bad(f"no output {str(output.get('name'))[:40]!r} (outputs: {', '.join(sorted(names))})")
        params = output.get("parameters")
        if params is None:
            params = output["parameters"] = {}
        if not isinstance(params, dict):
            raise _bad("an output's parameters must be an object")
        params.setdefault("binary_data", binary)
        k = params.get("classification")
        if k is not None and (type(k) is not int or k < 1):
            raise _bad(f"output {output['name']!r}: classification must be a positive integer")
    return asked


def _classification(values: np.ndarray, k: int, classes: list[dict[str, Any]]) -> np.ndarray:
    k = min(k, values.shape[1])
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return np.array(
        [[f"{values[r, i]:f}:{i}:{classes[i].get('name', i)}" for i in row] for r, row in enumerate(order)],
        dtype=object,
    )


def _encode(name: str, array: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes]:
    if array.dtype == object:
        datatype = "BYTES"
        flat = [str(v).encode() for v in array.reshape(-1)]
        blob = b"".join(struct.pack("<I", len(v)) + v for v in flat)
        data: Any = [v.decode() for v in flat]
    elif array.dtype == np.bool_:
        datatype, blob, data = "BOOL", array.astype("?").tobytes(), array.reshape(-1).tolist()
    else:
        array = array.astype(np.float32)
        datatype, blob, data = "FP32", array.astype("<f4").tobytes(), array.reshape(-1).tolist()
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": len(blob)}
        return tensor, blob
    tensor["data"] = data
    return tensor, b""


def infer(
    model_name: str, version: str | None, data: dict[str, Any], tail: memoryview, all_binary: bool = False
) -> tuple[dict[str, Any], list[bytes]]:
    """The protocol's inference, for REST and gRPC alike: the answer's JSON (outputs as tensors, with
    ``data`` unless binary) and each output's binary data (empty for a JSON one)."""
    model = _model(model_name, version)
    wanted = _wanted(model, data)
    if all_binary:
        for output in wanted:
            output["parameters"]["binary_data"] = True
    batch = _inputs(model, data, tail)
    model, outputs, _ = service().hosting.run(model, batch)
    logits = np.asarray(outputs[LOGITS], dtype=np.float32)
    classes = model.labels.get("classes", [])
    results = predictions(
        logits,
        classes,
        model.calibration,
        1,
        features=outputs.get(FEATURES),
        stage_features=outputs.get(STAGE_FEATURES),
        unknown_score=model.unknown,
    )
    tensors = {
        "logits": logits,
        "probabilities": softmax(logits, float(model.calibration.get("temperature") or 1.0)),
        "unknown": np.array([r.unknown for r in results], dtype=bool),
        "unknown_score": np.array(
            [np.nan if r.score is None else r.score for r in results], dtype=np.float32
        ),
    }
    if outputs.get(FEATURES) is not None:
        tensors["features"] = np.asarray(outputs[FEATURES], dtype=np.float32).reshape(len(logits), -1)
    out, blobs = [], []
    for output in wanted:
        name, params = output["name"], output.get("parameters") or {}
        if name not in tensors:
            raise _bad(f"output {name!r}: this model gives none")
        array = tensors[name]
        if params.get("classification"):
            if array.ndim != 2:
                raise _bad(f"output {name!r}: classification needs scores per class")
            array = _classification(array, int(params["classification"]), classes)
        tensor, blob = _encode(name, array, bool(params.get("binary_data")))
        out.append(tensor)
        blobs.append(blob)
    answer: dict[str, Any] = {"model_name": model.domain, "model_version": str(model.version), "outputs": out}
    if isinstance(data.get("id"), str):
        answer["id"] = data["id"][:256]
    return answer, blobs


def _infer(model_name: str, version: str | None) -> Response:
    _model(model_name, version)  # an unknown model or version is a 404 whatever the body
    data, tail = _body()
    answer, blobs = infer(model_name, version, data, tail)
    head = json.dumps(answer, separators=(",", ":")).encode()
    if not any(blobs):
        return Response(head, mimetype="application/json")
    response = Response(head + b"".join(blobs), mimetype="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(head))
    return response


INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string", "enum": ["image", "input"]},
                                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                    "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
                                    "parameters": {"type": "object"},
                                    "data": {
                                        "type": "array",
                                        "description": "base64 strings (BYTES) or numbers",
                                    },
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"binary tensor data: the JSON header, its length in {HEADER_LENGTH}, "
                    "then the tensors",
                },
            },
        },
    }
}


@blp.route("/models/<name:model>/infer")
class Infer(MethodView):
    @blp.doc(**INFER_DOC)
    @blp.response(200, description="the outputs (JSON; with binary data, JSON then the tensors)")
    @blp.alt_response(400, description="a bad request: shape, datatype, data, a non-image")
    @blp.alt_response(404, description="no such model")
    @blp.alt_response(413, description="too large (bytes, images, pixels)")
    def post(self, model: str) -> Response:
        """Inference (OIP): BYTES images or an FP32 batch in, logits, probabilities, unknown out"""
        return _infer(model, None)


@blp.route("/models/<name:model>/versions/<string:version>/infer")
class InferVersion(MethodView):
    @blp.doc(**INFER_DOC)
    @blp.response(200, description="the outputs (JSON; with binary data, JSON then the tensors)")
    @blp.alt_response(400, description="a bad request: shape, datatype, data, a non-image")
    @blp.alt_response(404, description="no such model, or not that version")
    @blp.alt_response(413, description="too large (bytes, images, pixels)")
    def post(self, model: str, version: str) -> Response:
        """Inference on a version (OIP): the loaded version, else 404"""
        return _infer(model, version)
