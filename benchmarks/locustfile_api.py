"""The locust user of benchmarks/api_load.py: posts photos to ``/v1/domains/{domain}/predict``.

    locust -f benchmarks/locustfile_api.py --headless -u 8 -r 1000 -t 300s --stop-timeout 30 \
        --host http://127.0.0.1:8000 --csv runs/bench/x/row --thali-domain south_asian_food \
        --thali-pool pool.txt --thali-mode miss --thali-requests 1500 --thali-warmup 64 \
        --thali-out runs/bench/x/row.json [--thali-server-pgid PID]

Started by api_load.py as a subprocess (locust monkeypatches the process with gevent). Every request is
a multipart upload of one JPEG from the pool (``--thali-pool``: a text file of image paths). Mode
``miss``: a few unique bytes are appended after each JPEG's end marker, so the server's answer cache never
hits; mode ``hit``: always the same image, so every answer after the first comes from the cache.
The Open Inference Protocol modes post to ``/v2/models/{domain}/infer`` with Triton's binary tensor
data: ``v2_bytes`` the JPEG as a BYTES element (unique bytes, as ``miss``), ``v2_fp32`` the photo
already prepared (``--thali-preprocess``: the package's preprocess.json, applied here once per photo,
before the load), and ``grpc`` the JPEG over gRPC (``--thali-grpc`` HOST:PORT, tritonclient.grpc with
gRPC on gevent).

The first ``--thali-warmup`` requests are logged as ``warmup``, the next ``--thali-requests`` as
``predict`` (the measured ones, the ``predict`` row of the CSV stats); then every user stops and the
last one ends the test, so a run stops by itself (``-t`` caps its time). ``--thali-out`` receives the
measured phase's wall time, client and server (``Server-Timing``) milliseconds, the answers'
``timings_ms`` and ``cached`` flags, and CPU seconds of this process, of the server's process group and
of the whole machine over the measured phase.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC

BOUNDARY = "thali-load-boundary-5f0c2a"
CLOCK = os.sysconf("SC_CLK_TCK")


class Run:
    """What every user of this process shares."""

    images: list[bytes] = []
    started = 0  # requests begun (warm-up included)
    users_done = 0
    measured_done = 0  # measured requests finished, answered or failed
    measure_began: float | None = None
    measure_ended: float | None = None
    cpu_began: dict[str, float] = {}
    cpu_ended: dict[str, float] = {}
    client_ms: list[float] = []
    server_ms: list[float] = []
    timings: list[list[float]] = []  # decode, queue, inference (ms) per measured answer
    cached = 0
    answers = 0
    bad: list[str] = []
    written = False
    tensors: list[bytes] = []  # v2_fp32: each pool photo prepared, float32 little-endian
    tensor_shape: list[int] = []


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--thali-domain", default="south_asian_food", include_in_web_ui=False)
    parser.add_argument(
        "--thali-pool", default="", help="text file: one JPEG path a line", include_in_web_ui=False
    )
    parser.add_argument(
        "--thali-mode",
        choices=["miss", "hit", "v2_bytes", "v2_fp32", "grpc"],
        default="miss",
        include_in_web_ui=False,
    )
    parser.add_argument(
        "--thali-preprocess", default="", help="preprocess.json (v2_fp32)", include_in_web_ui=False
    )
    parser.add_argument(
        "--thali-grpc", default="", help="HOST:PORT of the gRPC server", include_in_web_ui=False
    )
    parser.add_argument("--thali-requests", type=int, default=1000, include_in_web_ui=False)
    parser.add_argument("--thali-warmup", type=int, default=32, include_in_web_ui=False)
    parser.add_argument("--thali-out", default="", help="JSON of the measured phase", include_in_web_ui=False)
    parser.add_argument("--thali-server-pgid", type=int, default=0, include_in_web_ui=False)


@events.test_start.add_listener
def _load_pool(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    paths = [line.strip() for line in Path(options.thali_pool).read_text().splitlines() if line.strip()]
    Run.images = [Path(p).read_bytes() for p in paths]
    if not Run.images:
        raise SystemExit(f"{options.thali_pool}: no images")
    if options.thali_mode == "v2_fp32":  # prepared once here: the load measures the server, not this
        from thali.core.inference import Preprocessor

        prepare = Preprocessor(json.loads(Path(options.thali_preprocess).read_text()))
        Run.tensors = [prepare(image).astype("<f4").tobytes() for image in Run.images]
        Run.tensor_shape = [1, *prepare(Run.images[0]).shape]
    if options.thali_mode == "grpc":
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()  # gRPC's blocking calls yield to the other users


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in process group ``pgid``."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLOCK, sum(values) / CLOCK


def cpu_snapshot(pgid: int) -> dict[str, float]:
    busy, total = machine_cpu_s()
    times = os.times()
    return {
        "locust_s": times.user + times.system,
        "server_s": group_cpu_s(pgid) if pgid else 0.0,
        "machine_busy_s": busy,
        "machine_total_s": total,
    }


def unique(image: bytes, n: int) -> bytes:
    """``image`` with bytes the server has not seen after its end marker (decoders ignore them)."""
    return image + n.to_bytes(8, "big") + random.getrandbits(64).to_bytes(8, "big")


def multipart(image: bytes) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def write_out(environment: Any) -> None:
    options = environment.parsed_options
    if Run.written or not options.thali_out:
        return
    Run.written = True
    if Run.measure_began is not None and Run.measure_ended is None:  # stopped by the time cap
        Run.measure_ended = time.perf_counter()
        Run.cpu_ended = cpu_snapshot(options.thali_server_pgid)
    data = {
        "mode": options.thali_mode,
        "requests_asked": options.thali_requests,
        "warmup": options.thali_warmup,
        "users": options.num_users,
        "wall_s": (Run.measure_ended or 0.0) - (Run.measure_began or 0.0),
        "cpu_began": Run.cpu_began,
        "cpu_ended": Run.cpu_ended,
        "finished": Run.measured_done,
        "answers": Run.answers,
        "cached": Run.cached,
        "client_ms": Run.client_ms,
        "server_ms": Run.server_ms,
        "timings_ms": Run.timings,
        "bad": Run.bad[:20],
        "bad_count": len(Run.bad),
    }
    Path(options.thali_out).write_text(json.dumps(data))


@events.test_stop.add_listener
def _test_stop(environment: Any, **_: Any) -> None:
    write_out(environment)


@events.quitting.add_listener
def _quitting(environment: Any, **_: Any) -> None:
    write_out(environment)


class PhotoUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self) -> None:
        options = self.environment.parsed_options
        index = Run.started
        warmup, total = options.thali_warmup, options.thali_warmup + options.thali_requests
        if index >= total:
            self._finish()
        Run.started += 1
        measured = index >= warmup
        if measured and Run.measure_began is None:
            Run.cpu_began = cpu_snapshot(options.thali_server_pgid)
            Run.measure_began = time.perf_counter()
        if options.thali_mode == "hit":
            image = Run.images[0]
        else:
            image = unique(Run.images[index % len(Run.images)], index)
        began = time.perf_counter()
        post = {"v2_bytes": self._v2, "v2_fp32": self._v2, "grpc": self._grpc}.get(
            options.thali_mode, self._post
        )
        if options.thali_mode == "v2_fp32":
            image = Run.tensors[index % len(Run.tensors)]
        try:
            post(options.thali_domain, image, measured, began)
        finally:
            if measured:
                Run.measured_done += 1
                if Run.measured_done >= options.thali_requests and Run.measure_ended is None:
                    Run.measure_ended = time.perf_counter()
                    Run.cpu_ended = cpu_snapshot(options.thali_server_pgid)

    def _post(self, domain: str, image: bytes, measured: bool, began: float) -> None:
        with self.client.post(
            f"/v1/domains/{domain}/predict",
            data=multipart(image),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
            name="predict" if measured else "warmup",
            catch_response=True,
        ) as response:
            took_ms = 1000 * (time.perf_counter() - began)
            if response.status_code != 200:
                Run.bad.append(f"{response.status_code}: {(response.text or '')[:200]}")
                response.failure(f"HTTP {response.status_code}")
                return
            try:
                answer = response.json()
                answer["predictions"][0]["label"]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                Run.bad.append(f"unreadable answer ({type(exc).__name__})")
                response.failure("unreadable answer")
                return
            response.success()
            if not measured:
                return
            Run.answers += 1
            Run.cached += bool(answer.get("cached"))
            Run.client_ms.append(took_ms)
            header = response.headers.get("Server-Timing") or ""
            if "dur=" in header:
                Run.server_ms.append(float(header.split("dur=", 1)[1].split(";")[0].split(",")[0]))
            t = answer.get("timings_ms") or {}
            Run.timings.append([float(t.get(k, 0.0)) for k in ("decode", "queue", "inference")])

    def _v2(self, domain: str, data: bytes, measured: bool, began: float) -> None:
        """One Open Inference Protocol request with binary tensor data (what tritonclient sends)."""
        fp32 = self.environment.parsed_options.thali_mode == "v2_fp32"
        blob = data if fp32 else struct.pack("<I", len(data)) + data
        tensor = {
            "name": "input" if fp32 else "image",
            "shape": Run.tensor_shape if fp32 else [1],
            "datatype": "FP32" if fp32 else "BYTES",
            "parameters": {"binary_data_size": len(blob)},
        }
        outputs = [{"name": n, "parameters": {"binary_data": True}} for n in ("probabilities", "unknown")]
        head = json.dumps({"inputs": [tensor], "outputs": outputs}).encode()
        with self.client.post(
            f"/v2/models/{domain}/infer",
            data=head + blob,
            headers={
                "Inference-Header-Content-Length": str(len(head)),
                "Content-Type": "application/octet-stream",
            },
            name="predict" if measured else "warmup",
            catch_response=True,
        ) as response:
            took_ms = 1000 * (time.perf_counter() - began)
            length = int(response.headers.get("Inference-Header-Content-Length") or 0)
            if response.status_code != 200 or not length:
                Run.bad.append(f"{response.status_code}: {(response.text or '')[:200]}")
                response.failure(f"HTTP {response.status_code}")
                return
            answer = json.loads(response.content[:length])
            if [o["name"] for o in answer["outputs"]] != ["probabilities", "unknown"]:
                Run.bad.append("unreadable answer")
                response.failure("unreadable answer")
                return
            response.success()
            self._measured(measured, took_ms, response.headers.get("Server-Timing") or "")

    def _grpc(self, domain: str, data: bytes, measured: bool, began: float) -> None:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from locust.exception import RescheduleTask

        if not hasattr(self, "grpc_client"):
            self.grpc_client = grpcclient.InferenceServerClient(
                url=self.environment.parsed_options.thali_grpc
            )
        image = grpcclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([data], dtype=np.object_))
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("probabilities", "unknown")]
        name = "predict" if measured else "warmup"
        try:
            result = self.grpc_client.infer(domain, [image], outputs=outputs)
            result.as_numpy("probabilities")
        except Exception as exc:  # one failed request, counted like an HTTP one
            took_ms = 1000 * (time.perf_counter() - began)
            Run.bad.append(f"gRPC: {str(exc)[:200]}")
            self.environment.events.request.fire(
                request_type="gRPC", name=name, response_time=took_ms, response_length=0, exception=exc
            )
            raise RescheduleTask() from None
        took_ms = 1000 * (time.perf_counter() - began)
        self.environment.events.request.fire(
            request_type="gRPC", name=name, response_time=took_ms, response_length=0, exception=None
        )
        self._measured(measured, took_ms, "")

    def _measured(self, measured: bool, took_ms: float, server_timing: str) -> None:
        if not measured:
            return
        Run.answers += 1
        Run.client_ms.append(took_ms)
        if "dur=" in server_timing:
            Run.server_ms.append(float(server_timing.split("dur=", 1)[1].split(";")[0].split(",")[0]))

    def on_stop(self) -> None:
        client = getattr(self, "grpc_client", None)
        if client is not None:  # its channel's threads would keep the process from ending
            client.close()
            del self.grpc_client

    def _finish(self) -> None:
        """Budget spent: this user stops; the last one to stop ends the test."""
        self.on_stop()
        options = self.environment.parsed_options
        Run.users_done += 1
        if Run.users_done >= options.num_users:
            write_out(self.environment)
            # locust writes the CSV stats every CSV_STATS_INTERVAL_SEC, not at quit: one more round first
            gevent.spawn_later(CSV_STATS_INTERVAL_SEC + 0.5, self.environment.runner.quit)
        raise StopUser()
