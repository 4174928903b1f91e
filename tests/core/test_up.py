"""``thali up`` (what ``make run`` runs): the API and the UI as real processes, their URLs printed, both
stopped by one Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import requests
from api_support import free_port, jpeg
from helpers import kill_tree, read_until, thali_command


def test_up_serves_a_registry_and_the_ui_and_stops_both_on_ctrl_c(api_registry: Path, tmp_path: Path) -> None:
    port, ui_port = free_port(), free_port()
    env = {**os.environ, "THALI_REGISTRY": str(api_registry), "THALI_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [*thali_command(), "up", "--port", str(port), "--ui-port", str(ui_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        # started the way a shell starts a background job: SIGINT ignored; Ctrl-C must still stop both
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        out = read_until(process, "Ctrl-C stops both", 180)
        assert f"UI       http://127.0.0.1:{ui_port}" in out, out[-3000:]
        assert f"Swagger  http://127.0.0.1:{port}/docs" in out and str(api_registry) in out
        api = f"http://127.0.0.1:{port}"
        answer = requests.post(
            f"{api}/v1/domains/tiny/predict", files={"image": jpeg("red")}, timeout=30
        ).json()
        assert answer["predictions"][0]["label"] == "red"
        assert requests.get(f"http://127.0.0.1:{ui_port}/_stcore/health", timeout=10).text.strip() == "ok"
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert process.wait(timeout=60) == 0
        for url in (f"{api}/healthz", f"http://127.0.0.1:{ui_port}/_stcore/health"):
            try:
                requests.get(url, timeout=2)
                raise AssertionError(f"{url} still answers after Ctrl-C")
            except requests.ConnectionError:
                pass
    finally:  # thali up starts the API and the UI in groups of their own: end the whole tree
        kill_tree(process)


def test_an_api_worker_that_does_not_stop_is_killed_with_its_server(
    api_registry: Path, tmp_path: Path
) -> None:
    """A gunicorn worker that cannot stop (here: frozen with SIGSTOP) must not outlive Ctrl-C: thali up
    kills the API's whole process group after its grace period, so no orphaned worker keeps the port."""
    from helpers import alive, descendants, processes

    port, ui_port = free_port(), free_port()
    env = {**os.environ, "THALI_REGISTRY": str(api_registry), "THALI_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [*thali_command(), "up", "--port", str(port), "--ui-port", str(ui_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        read_until(process, "Ctrl-C stops both", 180)
        started = descendants(process.pid)
        table = processes()
        (master,) = [  # thali up's child `thali serve`: the gunicorn master
            p
            for p in started
            if table[p][0] == process.pid and "serve" in Path(f"/proc/{p}/cmdline").read_text().split("\0")
        ]
        (worker,) = descendants(master)  # gunicorn's one worker
        os.kill(worker, signal.SIGSTOP)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=90) == 0
        assert "did not stop within" in process.stdout.read()  # type: ignore[union-attr]
        assert not alive(started), alive(started)
    finally:
        kill_tree(process)
