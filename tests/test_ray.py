"""Scale-out on Ray (runtime/ray/): a local Ray cluster on 127.0.0.1 (2 CPUs, so two actors or replicas; a
100 MB object store), Ray Data embedding of shards and datasets, a killed run resumed, and the Ray Serve
deployment over real HTTP. Every vector is compared with Encoder.encode. Needs the ray extra."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder

from .runner_helpers import burst_of_long_texts

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a local Ray cluster: the full suite's


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster; yields its GCS address, for drivers in other processes."""
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _texts(corpus: list[str], n: int, start: int) -> list[str]:
    return [corpus[(start + i) % len(corpus)] * (1 + (start + i) % 3) for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # ensure_ascii=False keeps U+2028 raw inside a line: a record must still be one "\n"-terminated line.
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _read_output(path: Path, id_column: str = "id") -> tuple[list[Any], np.ndarray]:
    table = pq.read_table(path)
    dims = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(table.num_rows, dims)
    return table.column(id_column).to_pylist(), vectors


def test_folder_of_shards_matches_the_encoder(cluster: str, tiny_model: Path, corpus: list[str],
                                              tmp_path: Path) -> None:
    from deberta_onnx.runtime.ray import embed_corpus

    source = tmp_path / "corpus"
    expected: dict[str, tuple[list[Any], list[str]]] = {}
    for k in range(3):
        texts = _texts(corpus, 40 + 7 * k, 50 * k)
        texts[3] = "line\u2028separator and\x1cgroup separator"
        _write_jsonl(source / f"part-{k}.jsonl", [{"id": f"j{k}-{i}", "text": t} for i, t in enumerate(texts)])
        expected[f"part-{k}.parquet"] = ([f"j{k}-{i}" for i in range(len(texts))], texts)
    texts = [*_texts(corpus, 30, 300), "", "x" * 3000]
    (source / "nested").mkdir()
    pq.write_table(pa.table({"text": texts, "id": list(range(100, 100 + len(texts)))}),
                   source / "nested" / "p.parquet", row_group_size=9)
    expected["nested/p.parquet"] = (list(range(100, 100 + len(texts))), texts)
    _write_jsonl(source / "empty.jsonl", [])
    expected["empty.parquet"] = ([], [])

    report = embed_corpus(source, tiny_model, tmp_path / "out", chunk_rows=16, progress=False)
    assert (report.written, report.skipped) == (5, 0)
    assert report.rows == sum(len(ids) for ids, _ in expected.values())
    encoder = Encoder(tiny_model)
    for name, (ids, texts) in expected.items():
        got_ids, vectors = _read_output(tmp_path / "out" / name)
        assert got_ids == ids, name
        if texts:
            np.testing.assert_allclose(vectors, encoder.encode(texts), atol=1e-6, rtol=0, err_msg=name)
    # Normalised and truncated vectors, as Encoder.encode gives them, into another folder.
    report = embed_corpus(source / "part-1.jsonl", tiny_model, tmp_path / "out-norm", normalize=True, dimensions=8,
                          progress=False)
    _, vectors = _read_output(tmp_path / "out-norm" / "part-1.parquet")
    np.testing.assert_allclose(vectors, encoder.encode(expected["part-1.parquet"][1], normalize=True, dimensions=8),
                               atol=1e-6, rtol=0)
    # Run again: everything is skipped; with other settings the old shards are refused, not mixed in.
    again = embed_corpus(source, tiny_model, tmp_path / "out", progress=False)
    assert (again.written, again.skipped, again.rows) == (0, 5, 0)
    with pytest.raises(ValueError, match="written with another model or other settings"):
        embed_corpus(source, tiny_model, tmp_path / "out", normalize=True, progress=False)


def test_bad_shards_are_clear_errors(cluster: str, tiny_model: Path, tmp_path: Path) -> None:
    from deberta_onnx.runtime.ray import embed_corpus
    from deberta_onnx.runtime.ray.data import pending_shards

    with pytest.raises(FileNotFoundError, match="holds no"):
        embed_corpus(tmp_path, tiny_model, tmp_path / "out", progress=False)
    _write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "x"}])
    pq.write_table(pa.table({"text": ["y"]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(ValueError, match="would both write"):
        pending_shards(tmp_path / "in", tmp_path / "out")
    with pytest.raises(Exception, match="must be an object with \\['text', 'id'\\]"):
        embed_corpus(tmp_path / "in" / "a.jsonl", tiny_model, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "a.parquet").exists()


def test_a_killed_run_resumes(cluster: str, tiny_model: Path, corpus: list[str], tmp_path: Path) -> None:
    """A driver killed mid-run (SIGKILL) leaves complete shards only; running again writes the rest."""
    source, out = tmp_path / "corpus", tmp_path / "out"
    shards = {f"s{k:02d}": _texts(corpus, 120, 13 * k) for k in range(12)}
    for name, texts in shards.items():
        _write_jsonl(source / f"{name}.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    script = textwrap.dedent("""
        import sys, ray
        ray.init(address=sys.argv[1], log_to_driver=False)
        from deberta_onnx.runtime.ray import embed_corpus
        embed_corpus(sys.argv[2], sys.argv[3], sys.argv[4], concurrency=1, progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script, cluster, str(source), str(tiny_model), str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(out.glob("*.parquet")):
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
        assert time.monotonic() < deadline, "no shard written within 240 s"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    done = len(list(out.glob("*.parquet")))
    assert 1 <= done < len(shards), f"{done} of {len(shards)} shards were done when the run was killed"

    from deberta_onnx.runtime.ray import embed_corpus

    report = embed_corpus(source, tiny_model, out, progress=False)
    assert report.skipped >= done and report.written + report.skipped == len(shards)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial shard left
    encoder = Encoder(tiny_model)
    for name, texts in shards.items():
        ids, vectors = _read_output(out / f"{name}.parquet")
        assert ids == list(range(len(texts)))
        np.testing.assert_allclose(vectors, encoder.encode(texts), atol=1e-6, rtol=0, err_msg=name)


def test_a_ray_dataset_matches_the_encoder(cluster: str, tiny_model: Path, corpus: list[str], tmp_path: Path) -> None:
    from deberta_onnx.runtime.ray import embed_corpus, embed_dataset

    texts = _texts(corpus, 150, 7)
    dataset = ray.data.from_items([{"doc": f"d{i}", "body": t} for i, t in enumerate(texts)], override_num_blocks=4)
    rows = embed_dataset(dataset, tiny_model, text_column="body", rows_per_call=32, normalize=True).take_all()
    assert sorted(rows[0]) == ["doc", "embedding"]
    expected = Encoder(tiny_model).encode(texts, normalize=True)
    for row in rows:
        np.testing.assert_allclose(row["embedding"], expected[int(row["doc"][1:])], atol=1e-6, rtol=0)
    assert sorted(r["doc"] for r in rows) == sorted(f"d{i}" for i in range(len(texts)))

    report = embed_corpus(dataset, tiny_model, tmp_path / "out", text_column="body", progress=False)
    assert report.rows == len(texts)
    docs, vectors = [], []
    for path in sorted((tmp_path / "out").rglob("*.parquet")):
        ids, rows = _read_output(path, id_column="doc")
        docs += ids
        vectors.append(rows)
    assert sorted(docs) == sorted(f"d{i}" for i in range(len(texts)))
    np.testing.assert_allclose(np.concatenate(vectors), Encoder(tiny_model).encode([texts[int(d[1:])] for d in docs]),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not empty"):
        embed_corpus(dataset, tiny_model, tmp_path / "out", text_column="body", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def serve_url(cluster: str) -> str:
    """Ray Serve's HTTP proxy on a free port, started once per cluster: a later ``serve.start`` connects to the
    running instance and keeps its port, whatever port it is given."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def test_serve_deployment_speaks_the_server_api(serve_url: str, tiny_model: Path, corpus: list[str]) -> None:
    import httpx
    from ray import serve

    from deberta_onnx.runtime.ray import deployment

    serve.run(deployment(tiny_model, num_replicas=2), name="deberta-test", route_prefix="/")
    try:
        replicas = serve.status().applications["deberta-test"].deployments["deberta-onnx"].replica_states
        assert replicas == {"RUNNING": 2}
        url = serve_url
        texts = _texts(corpus, 64, 3)
        expected = Encoder(tiny_model).encode(texts, normalize=True)
        failures: list[str] = []

        def client(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                for n in range(worker, 64, 8):
                    chosen = [n, (n * 7) % 64]
                    body = {"input": [texts[i] for i in chosen], "model": "tiny"}
                    response = http.post("/v1/embeddings", json=body)
                    if response.status_code != 200:
                        failures.append(f"{n}: {response.status_code} {response.text[:200]}")
                        continue
                    got = np.asarray([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
                    if not np.allclose(got, expected[chosen], atol=1e-5, rtol=0):
                        failures.append(f"{n}: vectors differ")

        threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["status"] == "ok" and health["model"] == tiny_model.name and health["normalize"] is True
        assert httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"] == tiny_model.name
        bad = httpx.post(f"{url}/v1/embeddings", json={"input": []}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
        assert httpx.get(f"{url}/v2/nothing", timeout=30).json()["error"]["code"] == "not_found"
    finally:
        serve.delete("deberta-test")


def test_a_replicas_memory_comes_back_after_a_burst_of_long_texts(serve_url: str, tiny_model: Path) -> None:
    """A replica's process is its own, as ``deberta-onnx serve``'s is, and fixes glibc's mmap threshold the same
    way: its RSS after two bursts of 512-token requests is back within a few MB of where it was. Measured here
    with the fixed threshold: +4 to +7 MB of some 250. Without it the replica keeps some 30 MB more in most runs
    of a separate script but in only some runs of this test, so this test guards the bound rather than proving
    the fix."""
    import httpx
    import psutil
    from ray import serve

    from deberta_onnx.runtime.ray import deployment

    serve.run(deployment(tiny_model, num_replicas=1), name="deberta-memory", route_prefix="/")
    try:
        [replica] = [p for p in psutil.process_iter(["cmdline"])
                     if "ServeReplica:deberta-memory" in " ".join(p.info["cmdline"] or [])]
        for _ in range(5):
            assert httpx.post(f"{serve_url}/v1/embeddings", json={"input": ["a short text"]}, timeout=60).is_success
        before = replica.memory_info().rss
        peak = max(burst_of_long_texts(serve_url, replica) for _ in range(2))
        after = replica.memory_info().rss
        megabytes = [round(v / 2**20) for v in (before, peak, after)]
        assert peak - before > 100 * 2**20, megabytes  # the bursts did need memory
        assert after - before < 16 * 2**20, megabytes
    finally:
        serve.delete("deberta-memory")


def test_app_builder_reads_key_value_arguments(tiny_model: Path) -> None:
    from deberta_onnx.runtime.ray.serve import app

    built = app({"model_dir": str(tiny_model), "num_replicas": "2", "threads": "1", "max_wait_ms": "2.5",
                 "normalize": "false", "max_batch_size": "16"})
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown argument\\(s\\) colour"):
        app({"model_dir": str(tiny_model), "colour": "red"})
    with pytest.raises(ValueError, match="model_dir=DIR is required"):
        app({})
    with pytest.raises(ValueError, match="normalize must be true or false"):
        app({"model_dir": str(tiny_model), "normalize": "maybe"})


def test_serve_deployment_of_a_cross_encoder_reranks(serve_url: str, reranker: tuple[Path, Path]) -> None:
    """Whatever folder it is given, a replica serves the routes of its task: rerank scores equal
    ``CrossEncoder.predict``, and the replica's ``/metrics`` parse."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    from ray import serve

    from deberta_onnx.runtime import CrossEncoder
    from deberta_onnx.runtime.ray import deployment

    serve.run(deployment(reranker[1], num_replicas=1), name="deberta-rerank", route_prefix="/")
    try:
        url = serve_url
        query, documents = "which line goes to the coast", ["the coastal line", "a banana", "", "the station"]
        expected = np.asarray(CrossEncoder(reranker[1]).predict([(query, d) for d in documents]))
        body = httpx.post(f"{url}/v1/rerank", json={"query": query, "documents": documents}, timeout=60).json()
        got = {r["index"]: r["relevance_score"] for r in body["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(documents))], expected, atol=1e-5)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        names = {family.name for family in text_string_to_metric_families(metrics)}
        assert "deberta_onnx_requests" in names and "deberta_onnx_batch_texts" in names
    finally:
        serve.delete("deberta-rerank")


def test_serve_deployments_of_multiple_choice_and_fill_mask(serve_url: str, multiple_choice: tuple[Path, Path],
                                                           fill_mask: tuple[Path, Path]) -> None:
    """The new tasks deploy as any other: each replica serves its task's route, answering as the library does."""
    import httpx
    from ray import serve

    from deberta_onnx.runtime import FillMask, MultipleChoice
    from deberta_onnx.runtime.ray import deployment

    question = ("The kettle boiled, so she", ["made tea.", "went swimming.", "slept."])
    text = "The capital of France is [MASK]."
    serve.run(deployment(multiple_choice[1], num_replicas=1), name="deberta-choice", route_prefix="/")
    try:
        body = httpx.post(f"{serve_url}/v1/multiple-choice",
                          json={"input": {"prompt": question[0], "choices": question[1]}}, timeout=60).json()
        expected = MultipleChoice(multiple_choice[1]).predict(*question)
        np.testing.assert_allclose(body["data"][0]["scores"], expected.scores, atol=1e-5)
        assert body["data"][0]["answer"] == expected.answer
    finally:
        serve.delete("deberta-choice")
    serve.run(deployment(fill_mask[1], num_replicas=1), name="deberta-fill", route_prefix="/")
    try:
        body = httpx.post(f"{serve_url}/v1/fill-mask", json={"input": text, "top_k": 3}, timeout=60).json()
        expected_tokens = [c["token"] for c in FillMask(fill_mask[1])(text, top_k=3)]
        assert [c["token"] for c in body["data"][0]["masks"][0]] == expected_tokens
    finally:
        serve.delete("deberta-fill")


def test_serve_deployment_of_a_question_answering_folder_answers(serve_url: str, qa: tuple[Path, Path],
                                                                  corpus: list[str]) -> None:
    """A question-answering folder deploys like any other: its replica serves ``/v1/question-answering`` with
    ``QuestionAnswerer.answer``'s answers."""
    import httpx
    from ray import serve

    from deberta_onnx.runtime import QuestionAnswerer
    from deberta_onnx.runtime.ray import deployment

    serve.run(deployment(qa[1], num_replicas=1), name="deberta-qa", route_prefix="/")
    try:
        questions, context = ["Where?", "Who?"], " ".join(corpus[40:70])
        expected = QuestionAnswerer(qa[1]).answer(questions, [context] * 2)
        body = httpx.post(f"{serve_url}/v1/question-answering", json={"question": questions, "context": context},
                          timeout=60).json()
        got = [item["answers"][0] for item in body["data"]]
        assert [(a["start"], a["end"], a["answer"]) for a in got] == [
            (a["start"], a["end"], a["answer"]) for a in expected]  # type: ignore[index]
        scores = [a["score"] for a in expected]  # type: ignore[index]
        np.testing.assert_allclose([a["score"] for a in got], scores, atol=1e-5)
    finally:
        serve.delete("deberta-qa")
