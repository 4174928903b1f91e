"""The locust user of benchmarks/api_load.py: posts photos to ``/v1/domains/{domain}/predict``.

    locust -f benchmarks/locustfile_api.py --headless -u 8 -r 1000 -t 300s --stop-timeout 30 \
        --host http://127.0.0.1:8000 --csv runs/bench/x/row --thali-domain south_asian_food \
        --thali-pool pool.txt --thali-mode miss --thali-requests 1500 --thali-warmup 64 \
        --thali-out runs/bench/x/row.json [--thali-server-pgid PID]

Started by api_load.py as a subprocess (locust monkeypatches the process with gevent). Every request is
a multipart upload of one JPEG from the pool (``--thali-pool``: a text file of image paths). Mode
``miss``: a few unique bytes are appended after each JPEG's end marker, so the server's answer cache never
hits; mode ``hit``: always the same image, so every answer after the first comes from the cache.

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


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--thali-domain", default="south_asian_food", include_in_web_ui=False)
    parser.add_argument(
        "--thali-pool", default="", help="text file: one JPEG path a line", include_in_web_ui=False
    )
    parser.add_argument("--thali-mode", choices=["miss", "hit"], default="miss", include_in_web_ui=False)
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
        try:
            self._post(options.thali_domain, image, measured, began)
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

    def _finish(self) -> None:
        """Budget spent: this user stops; the last one to stop ends the test."""
        options = self.environment.parsed_options
        Run.users_done += 1
        if Run.users_done >= options.num_users:
            write_out(self.environment)
            # locust writes the CSV stats every CSV_STATS_INTERVAL_SEC, not at quit: one more round first
            gevent.spawn_later(CSV_STATS_INTERVAL_SEC + 0.5, self.environment.runner.quit)
        raise StopUser()
