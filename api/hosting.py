"""The loaded domains: resolve a package from the registry, build its serving backend, warm it, and swap
it in atomically. A swap never drops a request: the new model takes traffic only once it answered a
warm-up batch, and the old model's batcher drains what it already accepted before it closes."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from thali.core.errors import ConfigError, NotFoundError, ThaliError
from thali.core.export import CAM, FEATURES, LOGITS, STAGE_FEATURES
from thali.core.images import ImageLimits
from thali.core.inference import (
    BatcherClosed,
    MicroBatcher,
    Preprocessor,
    ServingBackend,
    load_backend,
    predictions,
)
from thali.core.inference.postprocess import heatmap_png
from thali.core.inference.unknown import UnknownScore
from thali.core.inference.unknown import load_spec as load_unknown
from thali.core.manifest import Manifest, ModelPackage
from thali.core.names import check_name, version_number
from thali.core.registry import Registries

from .cache import AnswerCache
from .errors import ApiError, public_text
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("thali.api")


@dataclass
class LoadedModel:
    """One domain's model as served: its verified package, backend, batcher and preprocessing."""

    domain: str
    ref: str
    package: ModelPackage
    variant: str
    backend_name: str
    backend: ServingBackend
    batcher: MicroBatcher
    preprocessor: Preprocessor
    top_k: int
    info: dict[str, Any]
    unknown: UnknownScore | None = None  # the package's feature score, when the backend gives features
    loaded_at: float = field(default_factory=time.time)
    feedback: bool = False  # this server takes corrections for it

    @property
    def version(self) -> int:
        return self.package.version

    @property
    def aliases(self) -> list[str]:
        return list(self.package.aliases)

    @property
    def labels(self) -> dict[str, Any]:
        return self.package.labels

    @property
    def calibration(self) -> dict[str, Any]:
        return self.package.calibration

    @property
    def manifest(self) -> Manifest:
        return self.package.manifest

    @property
    def card(self) -> dict[str, Any]:
        return self.package.card

    @property
    def signed_by(self) -> str | None:
        return self.package.signed_by

    @property
    def explainable(self) -> bool:
        return bool(self.info.get("explain")) and CAM in self.backend.capabilities

    def summary(self) -> dict[str, Any]:
        manifest = self.manifest
        metrics = manifest.variants.get(self.variant)
        return {
            "domain": self.domain,
            "display_name": self.domain.replace("_", " ").title(),
            "description": manifest.description,
            "version": self.version,
            "ref": self.ref,
            "aliases": self.aliases,
            "variant": self.variant,
            "backend": self.backend_name,
            "provider": str(self.info.get("provider", "")),
            "explain": self.explainable,
            "signed_by": self.signed_by,
            "top_k": self.top_k,
            "metrics": {k: getattr(metrics, k) if metrics else None for k in ("top1", "top5", "ece")},
            "licence": manifest.licence or "not stated",
            "classes": [
                {"name": c.get("name"), "display_name": c.get("display_name") or c.get("name")}
                for c in self.labels.get("classes", [])
            ],
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "feedback": self.feedback,
        }


@dataclass(frozen=True)
class ServingPlan:
    """How one package is served: read from its manifest, then the server's settings on top."""

    variant: str
    backend: str
    top_k: int
    max_batch_size: int
    max_wait_ms: float


def split_ref(text: str) -> tuple[str, str | None]:
    """``NAME[@REF]`` -> (name, ref or None), both through the name rule."""
    name, _, asked = text.partition("@")
    check_name(name.strip(), "domain")
    ref = asked.strip() or None
    if ref is not None and not (ref.lower() == "latest" or version_number(ref.lower()) is not None):
        check_name(ref, "version or alias")
    return name.strip(), ref


def engine_threads(workers: int) -> int:
    """Intra-op threads per engine worker when none are set: this process's CPUs shared among them."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, workers))


class Hosting:
    """The models of every domain this process serves."""

    def __init__(
        self, settings: Settings, registries: Registries, metrics: Metrics, cache: AnswerCache
    ) -> None:
        from thali.registry import ModelRegistry

        self.settings, self.registries, self.metrics, self.cache = settings, registries, metrics, cache
        self.registry = ModelRegistry(settings.registry, trusted_keys=settings.trusted_keys or None)
        self.models: dict[str, LoadedModel] = {}
        self.failures: dict[str, str] = {}  # domain -> why it is not served
        self.wanted: dict[str, str | None] = {}  # domain -> ref asked for (None: production, else latest)
        self._lock = threading.Lock()  # guards swaps; requests read self.models without it
        self._loading = threading.Lock()  # one build at a time (admin calls and the registry watch)
        self.watcher: Any = None  # a RegistryWatcher with `thali serve --watch`
        self.unloaded: set[str] = set()  # domains an admin unloaded: the watch does not bring them back
        #: domain -> variant an admin asked for: kept across swaps; else each version's own default
        self.pinned_variants: dict[str, str] = {}
        self.limits = ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_upload_bytes)
        self.feedback: Any = None  # a FeedbackStore when THALI_FEEDBACK is set
        self.recent: Any = None  # RecentPhotos: what feedback by image_sha256 finds

    def public(self, text: str) -> str:
        """A message fit for a public answer: no registry URL (it may hold credentials), no folder of
        this machine; domains, versions, file names and reasons stay."""
        hide = (self.registry.url, self.registry.root, str(self.registry.cache))
        return public_text(text, hide)

    def public_failures(self) -> dict[str, str]:
        return {name: self.public(why) for name, why in self.failures.items()}

    # -- loading -------------------------------------------------------------------------------
    def load_configured(self) -> None:
        """Load every configured domain (or every domain of the registry); failures are recorded for
        /readyz, never raised, so one broken package does not stop the others being served."""
        if self.settings.domains:
            wanted = []
            for text in self.settings.domains:
                try:
                    wanted.append(split_ref(text))
                except ConfigError as exc:
                    self.failures[text[:80]] = exc.message
                    log.error("not serving %r: %s", text[:80], exc.message)
        else:
            wanted = [(name, None) for name in self.registry.domains()]
            if not wanted:
                log.warning(
                    "registry %s holds no models yet; publish one with `thali publish`", self.registry.url
                )
        for name, ref in wanted:
            self.wanted[name] = ref
            try:
                self.load(name, ref)
            except ThaliError as exc:
                self.failures[name] = exc.message
                self.metrics.load_failures.labels(name).inc()
                log.error("not serving %s: %s", name, exc.message)

    def watched_ref(self, domain: str) -> str:
        """The ref the registry watch follows: the loaded model's (an admin load of a version pins it),
        else the configured one, else ``production`` when the domain has it, else ``latest``."""
        model, wanted = self.models.get(domain), self.wanted.get(domain)
        if model is not None and not (wanted is None and model.ref == "latest"):
            return model.ref
        return wanted or self._default_ref(domain)

    def _default_ref(self, domain: str) -> str:
        ref = self.registry.default_ref(domain)
        if ref == "latest":
            log.info("%s has no 'production' alias: serving its latest version", domain)
        return ref

    def build(self, domain: str, ref: str | None, variant: str | None = None) -> LoadedModel:
        """Resolve, verify, build and warm a model; nothing is swapped in here."""
        domain = check_name(domain, "domain")
        ref = ref or self._default_ref(domain)
        package = self.registry.resolve(domain, ref)
        plan = self.plan(package, variant)
        backend = self._backend(package, plan)
        info = dict(backend.info())
        unknown, wanted = self._unknown_outputs(package, plan, backend)
        explain = bool(info.get("explain")) and CAM in backend.capabilities

        def run(batch: np.ndarray, wants_heatmaps: bool) -> dict[str, np.ndarray]:
            # heatmaps cost ~15 % of the engine's throughput: only batches that hold an explain request
            return backend.run(batch, wanted | {CAM} if explain and wants_heatmaps else wanted)

        def on_batch(stats: Any) -> None:
            self.metrics.batch_size.labels(domain).observe(stats.size)
            self.metrics.queue_wait.labels(domain).observe(stats.queue_wait_s)
            self.metrics.inference.labels(domain).observe(stats.run_s)

        if self.settings.warmup:
            _, h, w = (int(v) for v in package.preprocess["input_size"])
            warm = np.zeros((min(plan.max_batch_size, 8), 3, h, w), dtype=np.float32)
            for size in sorted({1, len(warm)}):
                run(warm[:size], explain)
        batcher = MicroBatcher(
            run,
            max_batch_size=plan.max_batch_size,
            max_wait_ms=plan.max_wait_ms,
            name=domain,
            on_batch=on_batch,
            # several batches at once only on a backend that says it takes concurrent runs
            workers=self.settings.engine_workers if getattr(backend, "concurrent_runs", False) else 1,
            takes_flag=True,
        )
        return LoadedModel(
            domain=domain,
            ref=str(ref),
            package=package,
            variant=plan.variant,
            backend_name=plan.backend,
            backend=backend,
            batcher=batcher,
            preprocessor=Preprocessor(package.preprocess, self.limits),
            unknown=unknown,
            top_k=plan.top_k,
            info=info,
            feedback=bool(self.settings.feedback),
        )

    def plan(self, package: ModelPackage, variant: str | None = None) -> ServingPlan:
        """The manifest's serving defaults (what the export's config said, ``--set`` included), under
        this server's settings; a variant the package lacks falls back to fp32 with a warning."""
        serving = package.manifest.serving
        chosen = check_name(variant or self.settings.variant or serving.variant, "variant")
        if chosen not in package.variants:
            fallback = "fp32" if "fp32" in package.variants else sorted(package.variants)[0]
            log.warning(
                "%s v%d has no %s variant; serving %s", package.domain, package.version, chosen, fallback
            )
            chosen = fallback
        wait = self.settings.max_wait_ms
        return ServingPlan(
            variant=chosen,
            backend=self.settings.backend or serving.backend,
            top_k=serving.top_k,
            max_batch_size=self.settings.max_batch_size or serving.max_batch_size,
            max_wait_ms=serving.batch_timeout_ms if wait is None else wait,
        )

    def _backend(self, package: ModelPackage, plan: ServingPlan) -> ServingBackend:
        params: dict[str, Any] = {"variant": plan.variant, "package": package, "registries": self.registries}
        params["threads"] = self.settings.ort_threads or engine_threads(self.settings.engine_workers)
        params["spinning"] = self.settings.ort_spinning
        if self.settings.torch_run is not None:
            params["run_dir"] = self.settings.torch_run
        return load_backend(self.registries, plan.backend, package.model_path(plan.variant), **params)

    def _unknown_outputs(
        self, package: ModelPackage, plan: ServingPlan, backend: ServingBackend
    ) -> tuple[UnknownScore | None, frozenset[str]]:
        """The package's unknown score and the outputs it needs, when the backend declares them; else
        None (the flag falls back to the top probability) and a warning naming what is missing."""
        unknown = load_unknown(package.calibration)  # checked before serving: a bad spec fails the load
        if unknown is None:
            return None, frozenset()
        needs = frozenset({FEATURES, STAGE_FEATURES} if unknown.layers else {FEATURES})
        missing = sorted(needs - backend.capabilities)
        if missing:
            log.warning(
                "%s v%d: backend %s gives no %s, so the unknown flag uses the top probability",
                package.domain, package.version, plan.backend, " or ".join(missing),
            )  # fmt: skip
            return None, frozenset()
        return unknown, needs

    def load(self, domain: str, ref: str | None = None, variant: str | None = None) -> LoadedModel:
        """Build ``domain`` at ``ref`` and swap it in; the old model drains and closes."""
        with self._loading:
            return self._load(domain, ref, variant)

    def _load(self, domain: str, ref: str | None, variant: str | None) -> LoadedModel:
        model = self.build(domain, ref, variant)
        with self._lock:
            old = self.models.get(domain)
            self.models[domain] = model  # one assignment: requests see the old model or the new one
            self.failures.pop(domain, None)
            self.wanted.setdefault(domain, ref)
            self.unloaded.discard(domain)
        self._retire(old, model)
        log.info(
            "serving %s v%d (%s) %s on %s/%s",
            domain, model.version, model.ref, model.variant, model.backend_name, model.info.get("provider"),
        )  # fmt: skip
        return model

    def _retire(self, old: LoadedModel | None, new: LoadedModel | None) -> None:
        if old is not None:
            self.metrics.loaded.labels(
                old.domain, str(old.version), old.variant, old.backend_name, str(old.info.get("provider"))
            ).set(0)
            old.batcher.close(drain=True)
            if new is None or new.version != old.version or new.variant != old.variant:
                self.cache.drop_domain(old.domain)
        if new is not None:
            self.metrics.loaded.labels(
                new.domain, str(new.version), new.variant, new.backend_name, str(new.info.get("provider"))
            ).set(1)

    def pin(self, domain: str, ref: str | None, variant: str | None) -> LoadedModel:
        """An admin load: ``variant`` (if given) stays the domain's across later swaps."""
        model = self.load(domain, ref, variant)
        if variant:
            self.pinned_variants[domain] = model.variant
        else:
            self.pinned_variants.pop(domain, None)
        return model

    def unload(self, domain: str) -> None:
        with self._lock:
            old = self.models.pop(check_name(domain, "domain"), None)
            self.wanted.pop(domain, None)
            self.pinned_variants.pop(domain, None)
            self.unloaded.add(domain)
        if old is None:
            raise NotFoundError(f"domain {domain!r} is not loaded")
        self._retire(old, None)

    def reload(self, domain: str) -> LoadedModel:
        """Resolve the domain's ref again (an alias may have moved) and swap in what it names now."""
        model = self.get(domain)
        return self.load(domain, model.ref, self.pinned_variants.get(domain))

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        for model in list(self.models.values()):
            model.batcher.close(drain=False)

    # -- answering -----------------------------------------------------------------------------
    def get(self, domain: str) -> LoadedModel:
        try:
            check_name(domain, "domain")
        except ConfigError:
            raise NotFoundError(f"no domain {domain[:80]!r}: domain names are lowercase words") from None
        model = self.models.get(domain)
        if model is None:
            why = self.failures.get(domain)
            if why:
                why = self.public(why)
                raise ApiError(503, "unavailable", f"domain {domain!r} is not being served: {why}")
            loaded = ", ".join(sorted(self.models)) or "none"
            raise NotFoundError(f"domain {domain!r} is not loaded (loaded: {loaded})")
        return model

    def predict(
        self, domain: str, images: list[bytes], top_k: int | None, explain: bool
    ) -> list[dict[str, Any]]:
        """Answers for ``images`` (raw bytes) of one request; each is decoded within the limits."""
        model = self.get(domain)
        if explain and not model.explainable:
            raise ApiError(
                409,
                "explain_not_available",
                f"{domain} v{model.version} cannot explain: export it with export.explain: true "
                "(a 'cam' output), or serve it with the torch backend",
                errors={"explain": "not available for this model"},
            )
        k = top_k or model.top_k
        answers: list[dict[str, Any] | None] = [None] * len(images)
        keys: list[tuple[Any, ...]] = []
        todo: list[int] = []
        for i, data in enumerate(images):
            key = (domain, model.version, model.variant, hashlib.sha256(data).hexdigest(), k, explain)
            keys.append(key)
            hit = self.cache.get(key)
            self.metrics.cache.labels(domain, "hit" if hit else "miss").inc()
            if hit is not None:
                answers[i] = {
                    **hit,
                    "cached": True,
                    "timings_ms": {"decode": 0.0, "queue": 0.0, "inference": 0.0},
                }
            else:
                todo.append(i)
        if todo:
            self._infer(model, images, todo, keys, answers, k, explain)
        if self.recent is not None:  # feedback on: a correction may name the photo by its sha256
            for data, key, answer in zip(images, keys, answers, strict=True):
                if answer is not None:
                    self.recent.put(domain, key[3], data, answer)
        return [a for a in answers if a is not None]

    def run(
        self, model: LoadedModel, batch: np.ndarray, explain: bool = False, announced: bool = False
    ) -> tuple[LoadedModel, dict[str, Any], Any]:
        """``batch`` (N, 3, H, W) through the model's micro-batcher: (the model that ran it, its
        outputs, the batch stats). A model swapped while the batch queued hands it to the new one."""
        for attempt in range(2):
            try:
                future = model.batcher.submit(batch, announced=announced and attempt == 0, flag=explain)
                outputs, stats = future.result(timeout=self.settings.request_timeout_s)
                return model, outputs, stats
            except BatcherClosed:  # swapped while we queued: the new model answers (same domain)
                if attempt:
                    raise ApiError(503, "unavailable", f"{model.domain} is being reloaded; retry") from None
                model = self.get(model.domain)
            except FutureTimeout:
                raise ApiError(
                    503,
                    "unavailable",
                    f"{model.domain}: no answer within {self.settings.request_timeout_s:g} s (overloaded)",
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _infer(
        self,
        model: LoadedModel,
        images: list[bytes],
        todo: list[int],
        keys: list[tuple[Any, ...]],
        answers: list[dict[str, Any] | None],
        k: int,
        explain: bool,
    ) -> None:
        started = time.perf_counter()
        model.batcher.announce()
        try:
            crops = [model.preprocessor.crop(images[i]) for i in todo]
            batch = np.stack([model.preprocessor.normalise(c) for c in crops])
        except BaseException:
            model.batcher.withdraw()
            raise
        decoded = time.perf_counter()
        self.metrics.decode.labels(model.domain).observe((decoded - started) / len(todo))
        model, outputs, stats = self.run(model, batch, explain, announced=True)
        logits, features, cams = outputs[LOGITS], outputs.get(FEATURES), outputs.get(CAM)
        stages = outputs.get(STAGE_FEATURES)
        classes = model.labels.get("classes", [])
        results = predictions(
            logits,
            classes,
            model.calibration,
            k,
            features=features,
            stage_features=stages,
            unknown_score=model.unknown,
        )
        for n, (i, result) in enumerate(zip(todo, results, strict=True)):
            answer = {
                "domain": model.domain,
                "version": model.version,
                "variant": model.variant,
                **result.to_dict(),
            }
            if explain and cams is not None:
                top = result.top[0]["class_id"]
                answer["heatmap_png"] = heatmap_png(cams[n, top], crops[n])
            self.cache.put(keys[i], answer)
            self.metrics.observe_answer(model.domain, answer)
            answers[i] = {
                **answer,
                "cached": False,
                "timings_ms": {
                    "decode": round(1000 * (decoded - started) / len(todo), 3),
                    "queue": round(1000 * stats.queue_wait_s, 3),
                    "inference": round(1000 * stats.run_s, 3),
                },
            }
