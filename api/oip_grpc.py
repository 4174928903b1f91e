"""The Open Inference Protocol over gRPC (``GRPCInferenceService``: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer), on ``thali serve --grpc-port PORT``, in the same process as
the REST server: the same loaded models, micro-batchers, limits and metrics (:func:`.oip.infer` does the
work for both). The messages are the protocol's own (``grpc_service.proto``, as generated in
``tritonclient.grpc``; extra ``grpc``); the other RPCs of that service answer UNIMPLEMENTED. Errors are
gRPC statuses with the message the REST answer would carry."""

from __future__ import annotations

import atexit
import logging
from concurrent import futures
from typing import Any

from flask import Flask

from thali.core import __version__
from thali.core.errors import ThaliError

from . import oip

log = logging.getLogger("thali.api")


def _status(http: int) -> Any:
    import grpc

    return {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        404: grpc.StatusCode.NOT_FOUND,
        413: grpc.StatusCode.RESOURCE_EXHAUSTED,
        415: grpc.StatusCode.INVALID_ARGUMENT,
        503: grpc.StatusCode.UNAVAILABLE,
    }.get(http, grpc.StatusCode.INVALID_ARGUMENT if 400 <= http < 500 else grpc.StatusCode.INTERNAL)


def _servicer(app: Flask) -> Any:
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as rpc

    def answering(method: Any) -> Any:
        """Run ``method`` in the app's context; thali's errors become the matching gRPC status."""

        def call(self: Any, request: Any, context: Any) -> Any:
            with app.app_context():
                try:
                    return method(self, request, context)
                except ThaliError as exc:
                    context.abort(_status(exc.http_status), exc.message)
                except Exception:
                    log.exception("gRPC %s failed", method.__name__)
                    context.abort(_status(500), "internal error; see the server log")
            return None  # pragma: no cover - abort raises

        call.__name__ = method.__name__
        return call

    class Servicer(rpc.GRPCInferenceServiceServicer):
        @answering
        def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        @answering
        def ServerReady(self, request: Any, context: Any) -> Any:
            hosting = oip.service().hosting
            return pb.ServerReadyResponse(ready=bool(hosting.models) and not hosting.failures)

        @answering
        def ModelReady(self, request: Any, context: Any) -> Any:
            try:
                oip._model(request.name, request.version or None)
            except ThaliError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        @answering
        def ServerMetadata(self, request: Any, context: Any) -> Any:
            return pb.ServerMetadataResponse(name="thali", version=__version__, extensions=oip.EXTENSIONS)

        @answering
        def ModelMetadata(self, request: Any, context: Any) -> Any:
            meta = oip._metadata(oip._model(request.name, request.version or None))

            def tensors(items: list[dict[str, Any]]) -> list[Any]:
                return [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items]

            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=tensors(meta["inputs"]),
                outputs=tensors(meta["outputs"]),
            )

        @answering
        def ModelInfer(self, request: Any, context: Any) -> Any:
            data, tail = _request(request)
            answer, blobs = oip.infer(request.model_name, request.model_version or None, data, tail, True)
            response = pb.ModelInferResponse(
                model_name=answer["model_name"], model_version=answer["model_version"], id=request.id
            )
            for tensor, blob in zip(answer["outputs"], blobs, strict=True):
                response.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
                response.raw_output_contents.append(blob)
            return response

    return Servicer()


def _request(request: Any) -> tuple[dict[str, Any], memoryview]:
    """A ModelInferRequest as the REST body would say it: tensors as dicts, raw contents as the tail."""
    inputs, tail = [], b""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise oip._bad(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    for i, tensor in enumerate(request.inputs):
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            item["parameters"] = {"binary_data_size": len(raw[i])}
            tail += raw[i]
        elif tensor.datatype == "BYTES":
            item["data"] = list(tensor.contents.bytes_contents)
        else:
            item["data"] = list(tensor.contents.fp32_contents)
        inputs.append(item)
    outputs = []
    for output in request.outputs:
        params: dict[str, Any] = {}
        if "classification" in output.parameters:
            params["classification"] = int(output.parameters["classification"].int64_param)
        outputs.append({"name": output.name, "parameters": params})
    data: dict[str, Any] = {"inputs": inputs}
    if outputs:
        data["outputs"] = outputs
    return data, memoryview(tail)


def start_grpc(app: Flask, host: str, port: int, max_message_bytes: int, threads: int = 16) -> Any:
    """The gRPC server of ``app`` on ``host:port`` (started; stopped at exit). Several gunicorn workers
    each start one on the same port (gRPC sets SO_REUSEPORT), as they share the HTTP port."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc as rpc

    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options)
    rpc.add_GRPCInferenceServiceServicer_to_server(_servicer(app), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise ThaliError(f"gRPC: cannot listen on {host}:{port}")
    server.start()
    atexit.register(server.stop, 2)
    log.info("Open Inference Protocol gRPC on %s:%d", host, port)
    return server
