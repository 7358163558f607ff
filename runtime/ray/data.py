"""Offline embedding of large corpora with Ray Data, through an actor pool of ``Encoder``s sized to the cluster.

    from deberta_onnx.runtime.ray import embed_corpus
    report = embed_corpus("corpus/", "models/deberta-v3-base", "vectors/")   # a folder of Parquet/JSONL shards

- A **folder of shards** (``*.parquet``, ``*.jsonl``; or one such file) is resumable: each input shard becomes
  one output shard ``OUTPUT/<its relative path>.parquet`` with the columns ``id`` and ``embedding``, written
  under a temporary name and renamed into place when complete. A shard whose output exists is skipped, so a run
  that was killed, or lost a node, is resumed by running it again. Each actor reads, embeds and writes one shard
  at a time in chunks of ``chunk_rows`` (memory stays bounded whatever the shard's size); ``Encoder.encode``
  sorts each chunk by length, so little padding is computed.
- A **Ray dataset** (``ray.data.Dataset``) is embedded as a stream: ``embed_dataset`` gives a lazy dataset with
  the input's columns (text dropped) and ``embedding``; ``embed_corpus`` writes it to OUTPUT as Parquet (not
  resumable: Ray Data does not promise the same blocks twice).

Actors: ``concurrency`` (default: the cluster's CPUs divided by ``threads``), each with ``threads`` CPUs and one
ONNX Runtime session of that many threads. Progress: Ray Data's progress bars, and one line on stderr per shard written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ..checks import check_positive_int
from ..config import EncoderConfig
from ..encoder import Encoder
from ..files import atomic_write
from ..heap import fix_mmap_threshold
from ..manifest import sha256_file

__all__ = ["SHARD_SUFFIXES", "EmbedReport", "embed_corpus", "embed_dataset", "pending_shards"]

logger = logging.getLogger("deberta_onnx")

SHARD_SUFFIXES = (".parquet", ".jsonl")
EMBEDDING = "embedding"
_METADATA_KEY = b"deberta_onnx"


@dataclass(frozen=True, kw_only=True)
class EmbedReport:
    """What a run did. ``written``/``skipped``: output shards written now / found complete from an earlier run;
    ``rows``: rows embedded now; ``shards``: per written shard, its rows and seconds."""

    output_dir: Path
    written: int
    skipped: int
    rows: int
    seconds: float
    shards: dict[str, dict[str, float]] = field(default_factory=dict)


def _cluster_concurrency(threads: int) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)


def _fingerprint(model_dir: Path, settings: dict[str, Any]) -> str:
    """What the vectors depend on: the model's manifest (its files' checksums) and the encode settings."""
    return json.dumps({"manifest_sha256": sha256_file(model_dir / "manifest.json"), **settings}, sort_keys=True)


class _Embedder:
    """One actor of the pool: an ``Encoder`` and the encode settings."""

    def __init__(self, model_dir: str, config: EncoderConfig, settings: dict[str, Any]) -> None:
        if config.arena_shrink_tokens is not None:
            fix_mmap_threshold()  # an actor's process is its own: what long inputs freed goes back
        self.encoder = Encoder(model_dir, config=config)
        self.settings = settings

    def encode(self, texts: list[str]) -> np.ndarray:
        s = self.settings
        return self.encoder.encode(texts, s["batch_size"], s["normalize"], dimensions=s["dimensions"])


class _BatchEmbedder(_Embedder):
    """``map_batches`` over rows of a dataset: the text column becomes ``embedding``."""

    def __init__(self, model_dir: str, config: EncoderConfig, settings: dict[str, Any], text_column: str) -> None:
        super().__init__(model_dir, config, settings)
        self.text_column = text_column

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.text_column not in batch:
            raise KeyError(f"the dataset has no column {self.text_column!r} (it has {sorted(batch)}); pass "
                           "text_column=")
        texts = _checked(batch[self.text_column].tolist(), self.text_column, 0)
        columns: dict[str, Any] = {k: v for k, v in batch.items() if k != self.text_column}
        # The same column type as the shards' outputs: a fixed-size list of float32, not Ray's tensor type.
        return pa.table({**columns, EMBEDDING: _vectors(self.encode(texts))})


def embed_dataset(dataset: ray.data.Dataset, model_dir: str | Path, *, text_column: str = "text",
                  threads: int = 1, concurrency: int | None = None, rows_per_call: int = 256,
                  batch_size: int | None = None, normalize: bool = False, dimensions: int | None = None,
                  encoder_config: EncoderConfig | None = None) -> ray.data.Dataset:
    """A lazy dataset of ``dataset``'s rows with ``text_column`` replaced by ``embedding`` (float32 vectors).

    Args:
        dataset: rows with a text column; other columns (ids) pass through.
        model_dir: an exported embedding model folder, readable at the same path on every node.
        text_column: the column holding the texts.
        threads: ONNX Runtime threads (and Ray CPUs) per actor.
        concurrency: actors in the pool; default the cluster's CPUs divided by ``threads``.
        rows_per_call: rows per actor call (``map_batches``' ``batch_size``).
        batch_size, normalize, dimensions: as ``Encoder.encode`` takes them.
        encoder_config: loading options (``intra_op_threads`` is set from ``threads``).
    """
    check_positive_int("threads", threads)
    check_positive_int("rows_per_call", rows_per_call)
    check_positive_int("concurrency", concurrency, optional=True)
    config, settings = _settings(threads, batch_size, normalize, dimensions, encoder_config)
    return dataset.map_batches(
        _BatchEmbedder, fn_constructor_args=(str(model_dir), config, settings, text_column),
        batch_size=rows_per_call, batch_format="numpy", num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=concurrency or _cluster_concurrency(threads)),
    )


def _settings(threads: int, batch_size: int | None, normalize: bool, dimensions: int | None,
              encoder_config: EncoderConfig | None) -> tuple[EncoderConfig, dict[str, Any]]:
    config = dataclasses.replace(encoder_config or EncoderConfig(), intra_op_threads=threads)
    return config, {"batch_size": batch_size, "normalize": normalize, "dimensions": dimensions}


def pending_shards(source: str | Path, output_dir: str | Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """The shards of ``source`` still to embed and those already written.

    Returns:
        ``([(input shard, output shard), ...], [output shards found complete])``, both in path order.

    Raises:
        FileNotFoundError: ``source`` does not exist or holds no ``*.parquet`` / ``*.jsonl`` file.
        ValueError: two input shards would write the same output (``a.jsonl`` beside ``a.parquet``).
    """
    root = Path(source)
    if root.is_file():
        inputs, base = [root], root.parent
    elif root.is_dir():
        inputs = sorted(p for p in root.rglob("*") if p.suffix in SHARD_SUFFIXES and p.is_file()
                        and not p.name.startswith("."))
        base = root
    else:
        raise FileNotFoundError(f"{root} does not exist; pass a Parquet or JSONL file or a folder of them")
    if not inputs:
        raise FileNotFoundError(f"{root} holds no {' or '.join('*' + s for s in SHARD_SUFFIXES)} file")
    out = Path(output_dir)
    pending: list[tuple[Path, Path]] = []
    done: list[Path] = []
    seen: dict[Path, Path] = {}
    for shard in inputs:
        target = out / shard.relative_to(base).with_suffix(".parquet")
        if target in seen:
            raise ValueError(f"{seen[target]} and {shard} would both write {target}; rename one of them")
        seen[target] = shard
        if target.is_file():
            done.append(target)
        else:
            pending.append((shard, target))
    return pending, done


def _read_chunks(shard: Path, text_column: str, id_column: str | None, chunk_rows: int
                 ) -> Iterator[tuple[list[str], list[Any]]]:
    """(texts, ids) of ``shard`` in chunks; ids are row numbers in the shard when ``id_column`` is None."""
    row = 0
    if shard.suffix == ".parquet":
        file = pq.ParquetFile(shard)
        names = file.schema_arrow.names
        for column in (text_column, id_column):
            if column is not None and column not in names:
                raise KeyError(f"{shard} has no column {column!r} (it has {names}); pass text_column= / "
                               "id_column= (id_column=None numbers the rows)")
        columns = [text_column] + ([id_column] if id_column else [])
        for batch in file.iter_batches(batch_size=chunk_rows, columns=columns):
            texts = batch.column(text_column).to_pylist()
            ids = batch.column(id_column).to_pylist() if id_column else list(range(row, row + len(texts)))
            row += len(texts)
            yield _checked(texts, shard, row - len(texts)), ids
        return
    texts, ids = [], []
    with shard.open(encoding="utf-8", newline="\n") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{shard}:{number} is not a JSON object: {exc.msg}") from exc
            if not isinstance(record, dict) or text_column not in record or (id_column and id_column not in record):
                wanted = [text_column] + ([id_column] if id_column else [])
                raise KeyError(f"{shard}:{number} must be an object with {wanted}; pass text_column= / id_column= "
                               "(id_column=None numbers the rows)")
            texts.append(record[text_column])
            ids.append(record[id_column] if id_column else row)
            row += 1
            if len(texts) == chunk_rows:
                yield _checked(texts, shard, row - len(texts)), ids
                texts, ids = [], []
    if texts:
        yield _checked(texts, shard, row - len(texts)), ids


def _checked(texts: list[Any], where: object, first_row: int) -> list[str]:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{where}: row {first_row + index} has a text of type {type(text).__name__}, not str")
    return texts


class _ShardEmbedder(_Embedder):
    """``map_batches`` over a dataset of shard paths: each call embeds and writes whole shards."""

    def __init__(self, model_dir: str, config: EncoderConfig, settings: dict[str, Any], text_column: str,
                 id_column: str | None, chunk_rows: int, fingerprint: str) -> None:
        super().__init__(model_dir, config, settings)
        self.text_column, self.id_column, self.chunk_rows = text_column, id_column, chunk_rows
        self.fingerprint = fingerprint

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, seconds = [], []
        for shard, target in zip(batch["shard"].tolist(), batch["output"].tolist()):
            started = time.perf_counter()
            rows.append(self._write(Path(shard), Path(target)))
            seconds.append(time.perf_counter() - started)
        return {"shard": batch["shard"], "rows": np.asarray(rows, dtype=np.int64),
                "seconds": np.asarray(seconds, dtype=np.float64)}

    def _write(self, shard: Path, target: Path) -> int:
        written = 0

        def write(handle: Any) -> None:
            nonlocal written
            writer = None
            for texts, ids in _read_chunks(shard, self.text_column, self.id_column, self.chunk_rows):
                vectors = self.encode(texts)
                table = pa.table({"id": pa.array(ids), EMBEDDING: _vectors(vectors)})
                if writer is None:
                    metadata = {_METADATA_KEY: self.fingerprint.encode("utf-8")}
                    writer = pq.ParquetWriter(handle, table.schema.with_metadata(metadata))
                writer.write_table(table)
                written += len(texts)
            if writer is None:  # an empty shard still gets its (empty) output, so that it counts as done
                empty = pa.table({"id": pa.array([], pa.null()), EMBEDDING: _vectors(
                    np.zeros((0, self.encoder.hidden_size), np.float32))})
                writer = pq.ParquetWriter(handle, empty.schema.with_metadata(
                    {_METADATA_KEY: self.fingerprint.encode("utf-8")}))
            writer.close()

        atomic_write(target, write, durable=True)
        logger.info("embedded %s: %d rows -> %s", shard, written, target)
        return written


def _vectors(vectors: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def embed_corpus(source: ray.data.Dataset | str | Path, model_dir: str | Path, output_dir: str | Path, *,
                 text_column: str = "text", id_column: str | None = "id", threads: int = 1,
                 concurrency: int | None = None, chunk_rows: int = 8192, batch_size: int | None = None,
                 normalize: bool = False, dimensions: int | None = None, encoder_config: EncoderConfig | None = None,
                 progress: bool = True) -> EmbedReport:
    """Embeds a corpus on the Ray cluster (``ray.init`` it first, or Ray starts a local one) into Parquet.

    Args:
        source: a Parquet/JSONL file, a folder of them (resumable, see the module), or a ``ray.data.Dataset``.
        model_dir: an exported embedding model folder, readable at the same path on every node.
        output_dir: where the output shards go (created).
        text_column: the field holding each text.
        id_column: the field holding each row's id, written beside its vector; ``None`` numbers the rows of each
            shard from 0 (files only; a dataset's other columns pass through as they are).
        threads: ONNX Runtime threads (and Ray CPUs) per actor.
        concurrency: actors in the pool; default the cluster's CPUs divided by ``threads``.
        chunk_rows: rows read, embedded and written at a time within a shard.
        batch_size, normalize, dimensions: as ``Encoder.encode`` takes them.
        encoder_config: loading options (``intra_op_threads`` is set from ``threads``).
        progress: show Ray Data's progress bars.

    Returns:
        An ``EmbedReport``.

    Raises:
        FileNotFoundError: no shard in ``source``.
        ValueError: ``output_dir`` holds shards written with another model or other settings (the message says
            which), or bad arguments.
        KeyError / TypeError: a shard lacks the text or id column, or holds a text that is not a string.
    """
    check_positive_int("chunk_rows", chunk_rows)
    check_positive_int("threads", threads)
    check_positive_int("concurrency", concurrency, optional=True)
    context = ray.data.DataContext.get_current()
    shown = context.enable_progress_bars
    context.enable_progress_bars = progress
    try:
        return _embed(source, model_dir, Path(output_dir), text_column=text_column, id_column=id_column,
                      threads=threads, concurrency=concurrency, chunk_rows=chunk_rows, batch_size=batch_size,
                      normalize=normalize, dimensions=dimensions, encoder_config=encoder_config, progress=progress)
    finally:
        context.enable_progress_bars = shown


def _embed(source: ray.data.Dataset | str | Path, model_dir: str | Path, out: Path, *, text_column: str,
           id_column: str | None, threads: int, concurrency: int | None, chunk_rows: int, batch_size: int | None,
           normalize: bool, dimensions: int | None, encoder_config: EncoderConfig | None, progress: bool
           ) -> EmbedReport:
    started = time.perf_counter()
    if isinstance(source, ray.data.Dataset):
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty; a dataset run is not resumable and would add files beside the old "
                             "ones. Write to an empty folder, or pass a folder of shards to resume.")
        embedded = embed_dataset(source, model_dir, text_column=text_column, threads=threads,
                                 concurrency=concurrency, batch_size=batch_size, normalize=normalize,
                                 dimensions=dimensions, encoder_config=encoder_config)
        embedded.write_parquet(str(out))
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in out.rglob("*.parquet"))
        return EmbedReport(output_dir=out, written=len(list(out.rglob("*.parquet"))), skipped=0, rows=rows,
                           seconds=round(time.perf_counter() - started, 3))
    config, settings = _settings(threads, batch_size, normalize, dimensions, encoder_config)
    fingerprint = _fingerprint(Path(model_dir), {**settings, "precision": config.precision,
                                                 "text_column": text_column, "id_column": id_column})
    pending, done = pending_shards(source, out)
    _check_done(done, fingerprint)
    for stale in out.rglob(".*.tmp"):  # pieces of shards a killed run was writing
        stale.unlink()
    report: dict[str, dict[str, float]] = {}
    if pending:
        shards = ray.data.from_items([{"shard": str(s), "output": str(t)} for s, t in pending],
                                     override_num_blocks=len(pending))
        results = shards.map_batches(
            _ShardEmbedder, batch_size=1, batch_format="numpy", num_cpus=threads,
            fn_constructor_args=(str(model_dir), config, settings, text_column, id_column, chunk_rows, fingerprint),
            compute=ray.data.ActorPoolStrategy(size=min(len(pending), concurrency or _cluster_concurrency(threads))),
        )
        for row in results.iter_rows():
            report[str(row["shard"])] = {"rows": int(row["rows"]), "seconds": round(float(row["seconds"]), 3)}
            if progress:  # streamed as shards complete, whichever actor wrote them
                print(f"deberta-onnx: {len(report) + len(done)}/{len(pending) + len(done)} shards, {row['shard']}: "
                      f"{int(row['rows'])} rows in {float(row['seconds']):.1f} s", file=sys.stderr, flush=True)
    return EmbedReport(output_dir=out, written=len(report), skipped=len(done),
                       rows=sum(int(r["rows"]) for r in report.values()),
                       seconds=round(time.perf_counter() - started, 3), shards=report)


def _check_done(done: list[Path], fingerprint: str) -> None:
    for path in done:
        metadata = pq.read_schema(path).metadata or {}
        found = metadata.get(_METADATA_KEY, b"").decode("utf-8")
        if found != fingerprint:
            raise ValueError(
                f"{path} was written with another model or other settings ({found or 'not by deberta-onnx'}; "
                f"this run: {fingerprint}). Write to a fresh output folder, or delete the old shards."
            )
