"""``thali serve --watch SECONDS``: follow the registry. Each process polls the store for the refs it
serves (an alias such as ``production``, or ``latest``) and, when one names another version, builds and
warms that version and swaps it in (``Hosting.load``: the old model drains, no request fails).

A version that fails its checksum or signature is refused: the process keeps serving what it serves,
says so in ``/readyz`` (``watch.<domain>.refused``), the log (once per version) and the metrics
``thali_model_swaps_total{outcome="refused"}`` and ``thali_model_refused_version``, and tries that
version again only after a back-off (a damaged upload may be repaired in place). An unreachable store
or a vanished alias is one logged error and ``watch.<domain>.error``, never a crash.

Nothing here is shared between processes or replicas: each polls the store on its own, so the registry
is the only truth and a replica can be started or killed at any time."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from thali.core.errors import IntegrityError, ThaliError
from thali.core.names import version_number

log = logging.getLogger("thali.api.watch")

RETRY_REFUSED_POLLS = 10  # a refused version is verified again after this many polls


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RegistryWatcher:
    """A daemon thread that calls :meth:`poll` every ``interval`` seconds (±10 %, so replicas started
    together do not poll the store in step)."""

    def __init__(self, hosting: Any, interval: float) -> None:
        self.hosting, self.interval = hosting, float(interval)
        self.state: dict[str, dict[str, Any]] = {}  # domain -> what /readyz shows under "watch"
        self._refused_at: dict[tuple[str, int], int] = {}  # (domain, version) -> poll number
        self._said: dict[str, str] = {}  # domain -> last problem logged, so a problem is logged once
        self._polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thali-registry-watch", daemon=True)

    def start(self) -> RegistryWatcher:
        self._thread.start()
        log.info("watching %s every %.3g s for alias changes", self.hosting.registry.url, self.interval)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval * random.uniform(0.9, 1.1)):
            try:
                self.poll()
            except Exception:  # never let the thread die: the next poll tries again
                log.exception("registry watch: poll failed")

    # -- one poll ------------------------------------------------------------------------------
    def targets(self) -> list[str]:
        """The domains to follow: those configured (loaded or not yet), and with no ``--domain`` list
        every domain the registry holds, so a domain published later is served too; never one an admin
        unloaded (until an admin loads it again)."""
        names = set(self.hosting.wanted) | set(self.hosting.models)
        if not self.hosting.settings.domains:
            names |= set(self.hosting.registry.domains())
        return sorted(names - self.hosting.unloaded)

    def poll(self) -> None:
        self._polls += 1
        try:
            domains = self.targets()
        except Exception as exc:  # the store is unreachable: keep serving, say it once
            self._problem("*", f"cannot list {self.hosting.registry.url}: {type(exc).__name__}: {exc}")
            return
        for domain in domains:
            if self._stop.is_set():
                return
            try:
                self.follow(domain)
            except Exception as exc:
                message = exc.message if isinstance(exc, ThaliError) else f"{type(exc).__name__}: {exc}"
                self._state(domain)["error"] = message
                self._problem(domain, message)
                self.hosting.metrics.swaps.labels(domain, "failed").inc()

    def _state(self, domain: str) -> dict[str, Any]:
        return self.state.setdefault(domain, {"interval_s": self.interval, "refused": None, "error": None})

    def follow(self, domain: str) -> None:
        """Swap ``domain`` to the version its ref names now, unless it already serves it."""
        hosting = self.hosting
        model = hosting.models.get(domain)
        ref = hosting.watched_ref(domain)
        state = self._state(domain)
        state.update(ref=ref, checked_at=_now())
        if model is not None and version_number(ref.lower()) is not None:
            state["error"] = None  # a version number never moves
            return
        version = hosting.registry.resolve_version(domain, ref)
        if model is not None and model.version == version:
            state["error"] = None
            self._said.pop(domain, None)
            return
        refused = self._refused_at.get((domain, version))
        if refused is not None and self._polls - refused < RETRY_REFUSED_POLLS:
            return
        was = f"v{model.version}" if model is not None else "nothing"
        started = time.perf_counter()
        try:
            loaded = hosting.load(domain, ref, hosting.pinned_variants.get(domain))  # else the pack's
        except IntegrityError as exc:
            self._refused_at[(domain, version)] = self._polls
            state["refused"] = {"version": version, "error": exc.message, "at": _now()}
            hosting.metrics.swaps.labels(domain, "refused").inc()
            hosting.metrics.refused.labels(domain).set(version)
            self._problem(domain, f"refusing {domain} v{version} ({ref}): {exc.message}; still serving {was}")
            return
        self._refused_at = {k: v for k, v in self._refused_at.items() if k[0] != domain}
        state.update(refused=None, error=None, swapped_at=_now(), swaps=state.get("swaps", 0) + 1)
        hosting.metrics.swaps.labels(domain, "swapped").inc()
        hosting.metrics.refused.labels(domain).set(0)
        self._said.pop(domain, None)
        log.info(
            "%s: %s now names v%d; swapped %s -> v%d in %.1f s",
            domain, ref, loaded.version, was, loaded.version, time.perf_counter() - started,
        )  # fmt: skip

    def _problem(self, domain: str, message: str) -> None:
        if self._said.get(domain) != message:
            self._said[domain] = message
            log.error("registry watch: %s", message)
