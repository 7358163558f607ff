"""ServerMetrics (runtime/server/metrics.py): what the app and batcher record comes out of the exposition text,
read back with prometheus_client's own parsers (Prometheus text and OpenMetrics)."""

from __future__ import annotations

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from deberta_onnx.runtime.server.metrics import UNMATCHED_ROUTE, ServerMetrics

ROUTES = ("/v1/embeddings", "/v1/rerank", "/health", "/metrics")


def _samples(text: str, openmetrics: bool = False) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    parse = parse_openmetrics if openmetrics else parse_text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in parse(text) for s in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics() -> ServerMetrics:
    m = ServerMetrics(routes=ROUTES)
    m.add_model("xsmall", task="embedding", precision="int8-static", provider="CPUExecutionProvider")
    m.add_model("rr", task="sequence-classification", precision="fp32", provider="CPUExecutionProvider")
    return m


def test_recorded_values_come_out_in_the_exposition(metrics: ServerMetrics) -> None:
    queue = {"texts": 7, "requests": 3}
    metrics.track_queue("xsmall", texts=lambda: queue["texts"], requests=lambda: queue["requests"])
    for status, seconds in ((200, 0.004), (200, 0.02), (429, 0.0001), (400, 0.0002)):
        metrics.observe_request("/v1/embeddings", status, seconds=seconds)
    metrics.observe_request("/v1/rerank", 200, seconds=0.3)
    metrics.observe_request("/wp-admin/setup.php", 404, seconds=0.0001)
    metrics.observe_request(None, 404, seconds=0.0001)
    metrics.observe_queue_wait("xsmall", 0.003)
    metrics.observe_batch("xsmall", requests=3, texts=7, tokens=180, padded_tokens=224, seconds=0.009)
    metrics.observe_batch("xsmall", requests=1, texts=1, tokens=5, padded_tokens=5, seconds=0.002)
    metrics.observe_rejection("queue_full", "xsmall")
    metrics.observe_rejection("request_too_large")
    metrics.observe_timeout("rr")
    metrics.observe_failure("rr")

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    s = _samples(body.decode())
    assert _value(s, "deberta_onnx_requests_total", route="/v1/embeddings", status="200") == 2
    assert _value(s, "deberta_onnx_requests_total", route="/v1/embeddings", status="429") == 1
    assert _value(s, "deberta_onnx_requests_total", route=UNMATCHED_ROUTE, status="404") == 2
    assert not any(dict(labels).get("route") == "/wp-admin/setup.php" for _, labels in s)
    assert _value(s, "deberta_onnx_request_duration_seconds_count", route="/v1/embeddings") == 4
    assert _value(s, "deberta_onnx_request_duration_seconds_sum", route="/v1/embeddings") == pytest.approx(0.0243)
    assert _value(s, "deberta_onnx_request_duration_seconds_bucket", route="/v1/embeddings", le="0.005") == 3
    assert _value(s, "deberta_onnx_request_duration_seconds_bucket", route="/v1/rerank", le="0.25") == 0
    assert _value(s, "deberta_onnx_request_duration_seconds_bucket", route="/v1/rerank", le="+Inf") == 1
    assert _value(s, "deberta_onnx_queue_texts", model="xsmall") == 7
    assert _value(s, "deberta_onnx_queue_requests", model="xsmall") == 3
    assert _value(s, "deberta_onnx_batch_texts_sum", model="xsmall") == 8
    assert _value(s, "deberta_onnx_batch_texts_count", model="xsmall") == 2
    assert _value(s, "deberta_onnx_batch_requests_bucket", model="xsmall", le="2.0") == 1
    assert _value(s, "deberta_onnx_batch_tokens_sum", model="xsmall") == 185
    assert _value(s, "deberta_onnx_batch_padded_tokens_sum", model="xsmall") == 229
    assert _value(s, "deberta_onnx_model_call_seconds_count", model="xsmall") == 2
    assert _value(s, "deberta_onnx_queue_wait_seconds_count", model="xsmall") == 1
    assert _value(s, "deberta_onnx_rejections_total", model="xsmall", reason="queue_full") == 1
    assert _value(s, "deberta_onnx_rejections_total", model="", reason="request_too_large") == 1
    assert _value(s, "deberta_onnx_timeouts_total", model="rr") == 1
    assert _value(s, "deberta_onnx_failures_total", model="rr") == 1
    assert _value(s, "deberta_onnx_model_info", model="xsmall", task="embedding", precision="int8-static",
                  provider="CPUExecutionProvider") == 1
    # Declared models have their series at zero before any traffic.
    assert _value(s, "deberta_onnx_batch_texts_count", model="rr") == 0
    assert _value(s, "deberta_onnx_timeouts_total", model="xsmall") == 0
    assert _value(s, "process_resident_memory_bytes") > 0

    queue["texts"] = 0  # read at scrape time
    assert _value(_samples(metrics.render()[0].decode()), "deberta_onnx_queue_texts", model="xsmall") == 0


def test_openmetrics_when_the_scraper_asks(metrics: ServerMetrics) -> None:
    metrics.observe_request("/health", 200, seconds=0.001)
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    s = _samples(text, openmetrics=True)
    assert _value(s, "deberta_onnx_requests_total", route="/health", status="200") == 1


def test_each_app_has_its_own_registry() -> None:
    first, second = ServerMetrics(routes=ROUTES, process=False), ServerMetrics(routes=ROUTES, process=False)
    first.observe_request("/health", 200, seconds=0.001)
    s = _samples(second.render()[0].decode())
    assert ("deberta_onnx_requests_total", (("route", "/health"), ("status", "200"))) not in s
    assert not any(name.startswith("process_") for name, _ in s)
    assert _value(_samples(first.render()[0].decode()), "deberta_onnx_requests_total", route="/health",
                  status="200") == 1
