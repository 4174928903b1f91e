"""Prometheus metrics (prometheus-client): requests by domain, endpoint and status, latency, batch sizes,
queue wait, engine time, cache hits, and per domain the predicted classes and a confidence histogram,
so drift can be watched. One registry per app; with several gunicorn workers
(``PROMETHEUS_MULTIPROC_DIR`` set by ``thali serve``) the workers' values are summed at scrape time."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # None with several workers: the values go to PROMETHEUS_MULTIPROC_DIR, summed by render()
        self.registry: CollectorRegistry | None = None if self.multiprocess else CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "thali_requests", "HTTP requests answered", ["domain", "endpoint", "status"], registry=registry
        )
        self.latency = Histogram(
            "thali_request_seconds",
            "request latency, server side",
            ["endpoint"],
            buckets=LATENCY,
            registry=registry,
        )
        self.batch_size = Histogram(
            "thali_batch_size", "images per engine batch", ["domain"], buckets=BATCH, registry=registry
        )
        self.queue_wait = Histogram(
            "thali_queue_wait_seconds",
            "wait before a batch ran",
            ["domain"],
            buckets=LATENCY,
            registry=registry,
        )
        self.inference = Histogram(
            "thali_inference_seconds", "engine time per batch", ["domain"], buckets=LATENCY, registry=registry
        )
        self.decode = Histogram(
            "thali_decode_seconds",
            "decode + preprocess time per image",
            ["domain"],
            buckets=LATENCY,
            registry=registry,
        )
        self.cache = Counter("thali_cache", "answer cache lookups", ["domain", "result"], registry=registry)
        self.feedback = Counter(
            "thali_feedback",
            "corrections received: the label given, and whether it agreed with the model's answer",
            ["domain", "label", "outcome"],
            registry=registry,
        )
        self.predictions = Counter(
            "thali_predictions", "top-1 predictions", ["domain", "label"], registry=registry
        )
        self.unknown = Counter(
            "thali_unknown_predictions", "answers flagged unknown", ["domain"], registry=registry
        )
        self.confidence = Histogram(
            "thali_top1_confidence",
            "calibrated top-1 probability",
            ["domain"],
            buckets=CONFIDENCE,
            registry=registry,
        )
        self.loaded = Gauge(
            "thali_model_loaded",
            "1 for the model version each domain serves",
            ["domain", "version", "variant", "backend", "provider"],
            multiprocess_mode="liveall",
            registry=registry,
        )
        self.swaps = Counter(
            "thali_model_swaps",
            "registry watch: versions swapped in, refused (checksum or signature) or failed to load",
            ["domain", "outcome"],
            registry=registry,
        )
        self.refused = Gauge(
            "thali_model_refused_version",
            "registry watch: the version refused last (0: none), while the old one is still served",
            ["domain"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.load_failures = Counter(
            "thali_model_load_failures", "models that failed to load", ["domain"], registry=registry
        )

    def render(self) -> tuple[bytes, str]:
        if self.registry is None:  # multiprocess
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_answer(self, domain: str, answer: dict[str, Any]) -> None:
        top = answer["predictions"][0]
        self.predictions.labels(domain, top["label"]).inc()
        self.confidence.labels(domain).observe(top["probability"])
        if answer["unknown"]:
            self.unknown.labels(domain).inc()
