"""Prometheus metrics of one service instance (its own registry, so tests can build many apps)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Counters, gauges and histograms of the service, registered in a private CollectorRegistry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("caption_http_requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "method", "status"], registry=r)
        self.http_seconds = Histogram("caption_http_request_duration_seconds", "HTTP request latency",
                                      ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("caption_images", "Uploaded images answered, by outcome (captioned, cached, error)",
                              ["outcome"], registry=r)
        self.cache_requests = Counter("caption_cache_requests", "Cache lookups by result (hit, miss, error)",
                                      ["result"], registry=r)
        self.batch_size = Histogram("caption_batch_size", "Images per generate() call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.generate_seconds = Histogram("caption_generate_duration_seconds", "Seconds per generate() call",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_images = Gauge("caption_queue_images", "Images waiting for or in the model", registry=r)
        self.model_load_seconds = Gauge("caption_model_load_seconds", "Seconds it took to load the model",
                                        registry=r)
        self.redis_up = Gauge("caption_redis_up", "1 when the last Redis operation succeeded, else 0", registry=r)

    def render(self) -> bytes:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)
