"""What the attacks of issue 24 cost a serving worker, before and after the fixes, side by side in one run.

    python benchmarks/attack_costs.py [--registry models] [--domain south_asian_food]
                                      [--before DIR] [--out runs/bench]

Each row is one request (or one slow-client scene) against a real ``thali serve`` (gunicorn, one worker,
127.0.0.1, a free port) of the bundled dish model. Around each request the worker's peak RSS is reset
(``/proc/PID/clear_refs`` 5) and read back (``VmHWM``), and its CPU time (utime + stime of every thread)
is read from ``/proc/PID/stat``: the table shows the extra peak memory and the CPU seconds the request
cost, its size and the status it got. ONNX Runtime's spinning threads are off so idle CPU does not count.

``--before DIR``: a checkout of the code before the fixes (``git worktree add DIR f2d1bf6``); the same
rows then run on a server of that code first, and the table shows both. Target (issue 24): no request
under 1 MB costs more than 100 MB or 1 s of CPU. Writes ``<out>/attack-costs-<time>/results.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import requests
from api_load import free_port, stop_server  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


# --- the attack payloads ------------------------------------------------------------------------------


def small_jpeg(seed: int, size: int = 32) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


def photo() -> bytes:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([(x % 256), (y % 256), ((x + y) % 256)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def thin_png(width: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, 1, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" + b"\x80" * width, 9))
        + chunk(b"IEND", b"")
    )


def scan_bomb(side: int = 6000, target_bytes: int = 488_000) -> bytes:
    """A 6000 x 6000 progressive JPEG whose smallest AC scan is repeated up to ``target_bytes``."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    grey = ((x + y) // 32 % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(buffer, "JPEG", progressive=True, quality=30)
    data = buffer.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data) - 2], strict=True)]
    small = min(scans[1:], key=len)
    repeats = max(1, (target_bytes - len(data)) // len(small))
    return data[:-2] + small * repeats + b"\xff\xd9"


def multipart(field: str, images: list[bytes]) -> tuple[bytes, str]:
    boundary = "thali-bench-boundary"
    parts = []
    for i, data in enumerate(images):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# --- the worker ----------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (all threads)


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Server:
    def __init__(self, registry: str, domain: str, code: Path | None, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "THALI_ORT_SPINNING": "false", "THALI_CACHE_ENTRIES": "0"}
        env["THALI_CACHE"] = tempfile.mkdtemp(prefix="thali-bench-cache-")
        self.shim = None
        if code is not None:  # the old code: a folder named thali on PYTHONPATH, ahead of the install
            self.shim = Path(tempfile.mkdtemp(prefix="thali-before-"))
            (self.shim / "thali").symlink_to(code.resolve())
            env["PYTHONPATH"] = os.pathsep.join([str(self.shim), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "thali.core.cli"]
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*command, "serve", "--registry", registry, "--domain", domain, "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited; see {log}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"server did not come up; see {log}")
        self.domain = domain.split("@")[0]

    def worker(self) -> int:
        kids = children(self.process.pid)
        if not kids:
            raise RuntimeError("no gunicorn worker")
        return kids[0]

    def wait_worker(self) -> int:
        """The worker, after a crash the master restarted (it loads the models again)."""
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self.worker()
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError("the worker did not come back")

    def stop(self) -> None:
        stop_server(self)  # type: ignore[arg-type] - it needs .process only
        self.log.close()
        if self.shim is not None:
            shutil.rmtree(self.shim, ignore_errors=True)


def measure(server: Server, name: str, send: Any, size: int) -> dict[str, Any]:
    pid = server.wait_worker()
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss, cpu = status_kb(pid, "VmRSS"), cpu_seconds(pid)
    started = time.perf_counter()
    try:
        status: Any = send()
    except requests.RequestException as exc:
        status = type(exc).__name__
    wall = time.perf_counter() - started
    time.sleep(0.3)  # let the worker finish what the client no longer waits for
    try:
        peak, used = status_kb(pid, "VmHWM"), cpu_seconds(pid) - cpu
    except (OSError, ValueError):
        peak, used = -1, float("nan")  # the worker died
    row = {
        "attack": name,
        "bytes": size,
        "status": status,
        "extra_peak_rss_mb": round((peak - rss) / 1024, 1) if peak >= 0 else "worker died",
        "cpu_s": round(used, 3),
        "wall_s": round(wall, 3),
    }
    print(f"  {name:<44} {size:>11,} B  {status!s:>17}  +{row['extra_peak_rss_mb']} MB  {row['cpu_s']} s CPU")
    return row


def slowloris(server: Server, sockets: int = 100) -> dict[str, Any]:
    held = []
    try:
        for _ in range(sockets):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"POST /v1/domains/x/predict HTT")
            held.append(sock)
        time.sleep(1.0)
        started = time.perf_counter()
        try:
            status: Any = requests.get(server.url + "/healthz", timeout=10).status_code
        except requests.RequestException as exc:
            status = type(exc).__name__
        took = time.perf_counter() - started
    finally:
        for sock in held:
            sock.close()
    print(f"  {'slowloris: /healthz beside 100 slow sockets':<44} {'':>13}  {status!s:>17}  {took:.3f} s")
    return {"attack": f"slowloris ({sockets} sockets): /healthz", "status": status, "wall_s": round(took, 3)}


def attacks(server: Server) -> list[dict[str, Any]]:
    predict = f"{server.url}/v1/domains/{server.domain}/predict"
    rows = []

    def post(body: bytes, content_type: str, url: str = predict) -> Any:
        headers = {"Content-Type": content_type}
        return lambda: requests.post(url, data=body, headers=headers, timeout=180).status_code

    normal, ctype = multipart("image", [photo()])
    rows.append(measure(server, "baseline: one 640x480 photo", post(normal, ctype), len(normal)))
    for count in (64, 700):
        body, ctype = multipart("image", [small_jpeg(i) for i in range(count)])
        name = f"1: {count} image parts on single /predict"
        rows.append(measure(server, name, post(body, ctype), len(body)))
    for width in (8000, 200_000):
        body, ctype = multipart("image", [thin_png(width)])
        rows.append(measure(server, f"4: {width} x 1 PNG", post(body, ctype), len(body)))
    bomb = scan_bomb()
    body, ctype = multipart("image", [bomb])
    name = "5: 6000x6000 progressive JPEG, scans repeated"
    rows.append(measure(server, name, post(body, ctype), len(body)))
    text = base64.b64encode(b"\xff" * (150 * 1024 * 1024)).decode()
    body = json.dumps({"image": text}).encode()
    del text
    name = "7: 200 MB JSON body on single /predict"
    rows.append(measure(server, name, post(body, "application/json"), len(body)))
    del body
    rows.append(slowloris(server))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registry", default=str(ROOT / "models"))
    parser.add_argument("--domain", default="south_asian_food")
    parser.add_argument("--before", type=Path, help="a checkout of the code before the fixes")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args()
    out = args.out / time.strftime("attack-costs-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for label, code in (("before", args.before), ("after", None)):
        if label == "before" and code is None:
            continue
        print(f"{label}: {code or ROOT}")
        server = Server(args.registry, args.domain, code, out / f"serve-{label}.log")
        try:
            results[label] = attacks(server)
        finally:
            server.stop()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if "before" in results:
        print("\nside by side (extra peak RSS MB / CPU s / status):")
        for old, new in zip(results["before"], results["after"], strict=True):
            print(
                f"  {new['attack']:<44} before {old.get('extra_peak_rss_mb', '-')!s:>10} MB "
                f"{old.get('cpu_s', old.get('wall_s'))!s:>7} s {old['status']!s:>17}   after "
                f"{new.get('extra_peak_rss_mb', '-')!s:>6} MB {new.get('cpu_s', new.get('wall_s'))!s:>7} s "
                f"{new['status']!s:>5}"
            )
    small = [r for r in results["after"] if isinstance(r.get("bytes"), int) and r["bytes"] < 1024 * 1024]
    worst_mb = max(float(r["extra_peak_rss_mb"]) for r in small)
    worst_cpu = max(float(r["cpu_s"]) for r in small)
    met = worst_mb <= 100 and worst_cpu <= 1
    print(
        f"\ntarget: no request under 1 MB costs > 100 MB or > 1 s CPU: worst {worst_mb} MB, {worst_cpu} s "
        f"-> {'met' if met else 'NOT met'}"
    )
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
