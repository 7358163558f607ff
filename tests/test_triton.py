"""export --triton: a Triton model repository whose config.pbtxt parses as Triton's ModelConfig protobuf and
agrees with the ONNX graph's inputs and outputs, and whose model, fed as a Triton client would (tokenized with
tokenizer.json), gives the runtime's vectors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from deberta_onnx.runtime import Encoder
from deberta_onnx.runtime.manifest import load_manifest, sha256_file

_DTYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def _model_config_pb2() -> ModuleType:
    """tritonclient's generated ModelConfig module, loaded from its file: importing it the usual way runs
    tritonclient.grpc's __init__, which needs the grpc extra (see pyproject.toml)."""
    package = importlib.util.find_spec("tritonclient")
    assert package is not None and package.submodule_search_locations, "install the dev extra (tritonclient)"
    path = Path(next(iter(package.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_config_pb2() -> ModuleType:
    return _model_config_pb2()


@pytest.fixture(scope="module")
def triton_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deberta_onnx.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("triton") / "tiny embedder"
    export_model(tiny_checkpoint, out, ExportConfig(quiet=True, token_embeddings=True, triton=True,
                                                    triton_max_batch_size=16, triton_max_queue_delay_us=500,
                                                    validation_shapes=((2, 9), (5, 40))))
    return out


def _parse(path: Path, pb2: ModuleType):  # type: ignore[no-untyped-def]
    return text_format.Parse(path.read_text(encoding="utf-8"), pb2.ModelConfig())


def _check_against_graph(config, model: onnx.ModelProto, pb2: ModuleType) -> None:  # type: ignore[no-untyped-def]
    """Every graph input and output appears in the config with its type, and with its dims minus the batch
    axis (symbolic dims as -1)."""
    for declared, actual in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [t.name for t in declared] == [t.name for t in actual]
        for entry, tensor in zip(declared, actual):
            dims = tensor.type.tensor_type.shape.dim
            assert dims[0].dim_param, f"{tensor.name}: the first axis must be the dynamic batch"
            assert list(entry.dims) == [d.dim_value if d.dim_value else -1 for d in dims[1:]], tensor.name
            assert _DTYPES[tensor.type.tensor_type.elem_type] == pb2.DataType.Name(entry.data_type)


def test_config_parses_and_matches_the_graph(triton_export: Path, model_config_pb2: ModuleType) -> None:
    model_dir = triton_export / "triton" / "tiny_embedder"
    config = _parse(model_dir / "config.pbtxt", model_config_pb2)
    assert config.name == "tiny_embedder" and config.backend == "onnxruntime"
    assert config.max_batch_size == 16
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    graph = onnx.load(str(model_dir / "1" / "model.onnx"))
    _check_against_graph(config, graph, model_config_pb2)
    assert {o.name: list(o.dims) for o in config.output} == {"sentence_embedding": [32], "token_embeddings": [-1, 32]}


def test_repository_holds_the_same_model_and_is_in_the_manifest(triton_export: Path) -> None:
    manifest = json.loads((triton_export / "manifest.json").read_text())
    assert manifest["triton"] == {"repository": "triton", "model_name": "tiny_embedder", "max_batch_size": 16,
                                  "max_queue_delay_us": 500}
    copy = "triton/tiny_embedder/1/model.onnx"
    assert manifest["files"][copy]["sha256"] == manifest["files"]["model.onnx"]["sha256"]
    assert sha256_file(triton_export / copy) == manifest["files"][copy]["sha256"]
    load_manifest(triton_export).verify_files([copy, "triton/tiny_embedder/config.pbtxt"])
    assert "tokenizer.json" not in {p.name for p in (triton_export / "triton").rglob("*")}  # client side


def test_client_side_tokenization_as_documented(triton_export: Path, corpus: list[str]) -> None:
    """docs/triton.md's client recipe (tokenize with tokenizer.json, pad, send ids and mask), with
    ONNX Runtime standing in for the server: the same vectors as the runtime."""
    from tokenizers import Tokenizer

    texts = [*corpus[:6], "x", "a longer text " * 30]
    tokenizer = Tokenizer.from_file(str(triton_export / "tokenizer.json"))
    tokenizer.enable_truncation(512)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", pad_to_multiple_of=32)
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    session = ort.InferenceSession(str(triton_export / "triton" / "tiny_embedder" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (vectors,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(vectors, Encoder(triton_export).encode(texts), atol=1e-5, rtol=0)


def test_classifier_config_has_labels_and_token_types(reranker: tuple[Path, Path], ner: tuple[Path, Path],
                                                      model_config_pb2: ModuleType, tmp_path: Path) -> None:
    """config.pbtxt for the classifier graphs, written from their manifests by the same function the export
    uses, against their ONNX graphs."""
    from deberta_onnx.export._triton import write_triton_repository

    for (_, folder), name in ((reranker, "reranker"), (ner, "ner")):
        manifest = load_manifest(folder)
        repo = tmp_path / name
        repo.mkdir()
        (repo / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
        write_triton_repository(repo, name=name, model_files=["model.onnx"], inputs=manifest.inputs,
                                outputs=manifest.outputs, labels=manifest.labels, max_batch_size=8,
                                max_queue_delay_us=0)
        config = _parse(repo / "triton" / name / "config.pbtxt", model_config_pb2)
        _check_against_graph(config, onnx.load(str(folder / "model.onnx")), model_config_pb2)
        (logits,) = config.output
        assert logits.label_filename == "labels.txt"
        labels = (repo / "triton" / name / "labels.txt").read_text().splitlines()
        assert labels == list(manifest.labels)
    assert [i.name for i in _parse(tmp_path / "reranker" / "triton" / "reranker" / "config.pbtxt",
                                   model_config_pb2).input][-1] == "token_type_ids"


def test_bad_triton_settings_are_refused() -> None:
    from deberta_onnx.export import ExportConfig

    with pytest.raises(ValueError, match="Triton model name"):
        ExportConfig(triton=True, triton_name="../escape")
    with pytest.raises(ValueError, match="triton_max_batch_size must be a positive int"):
        ExportConfig(triton=True, triton_max_batch_size=0)


@pytest.fixture(scope="module")
def triton_classifiers(reranker: tuple[Path, Path], ner: tuple[Path, Path],
                       tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reranker and the NER model exported again with their Triton repositories."""
    from deberta_onnx.export import ExportConfig, export_model

    out = {}
    for name, (checkpoint, _) in (("reranker", reranker), ("ner", ner)):
        target = tmp_path_factory.mktemp("triton-cls") / name
        export_model(checkpoint, target, ExportConfig(quiet=True, tokenizer="transformers", triton=True,
                                                      triton_max_batch_size=8, validation_shapes=((2, 9),)))
        out[name] = target
    return out


def _client_inputs(folder: Path, items: list, token_types: bool) -> dict[str, np.ndarray]:  # type: ignore[type-arg]
    """Tokenized as docs/triton.md's client does, pairs included (text, text_pair), segment ids if asked."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(512)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", pad_to_multiple_of=32)
    encodings = tokenizer.encode_batch(items)
    feed = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}
    if token_types:
        feed["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
    return feed


def test_exported_reranker_repository_scores_as_cross_encoder(
        triton_classifiers: dict[str, Path], model_config_pb2: ModuleType) -> None:
    """export --triton on a cross-encoder: config.pbtxt with logits, labels and token_type_ids, in the manifest;
    fed as a Triton client would, its logits, through the sigmoid docs/triton.md gives, are CrossEncoder.predict's."""
    from deberta_onnx.runtime import CrossEncoder
    from deberta_onnx.runtime.postprocess import sigmoid

    folder = triton_classifiers["reranker"]
    model_dir = folder / "triton" / "reranker"
    config = _parse(model_dir / "config.pbtxt", model_config_pb2)
    _check_against_graph(config, onnx.load(str(model_dir / "1" / "model.onnx")), model_config_pb2)
    assert [i.name for i in config.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [("logits", [1], "labels.txt")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["triton"]["model_name"] == "reranker"
    load_manifest(folder).verify_files(["triton/reranker/1/model.onnx", "triton/reranker/config.pbtxt",
                                        "triton/reranker/labels.txt"])
    pairs = [("what is the capital?", "Paris is the capital of France."), ("q", ""), ("long " * 300, "doc")]
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], _client_inputs(folder, pairs, token_types=True))
    model = CrossEncoder(folder)
    np.testing.assert_allclose(logits[:, 0], model.predict(pairs, activation=False), atol=1e-5, rtol=0)
    np.testing.assert_allclose(sigmoid(logits[:, 0]), model.predict(pairs), atol=1e-6, rtol=0)


def test_exported_token_classifier_repository_gives_token_logits(
        triton_classifiers: dict[str, Path], model_config_pb2: ModuleType) -> None:
    from deberta_onnx.runtime import TokenClassifier

    folder = triton_classifiers["ner"]
    model_dir = folder / "triton" / "ner"
    config = _parse(model_dir / "config.pbtxt", model_config_pb2)
    _check_against_graph(config, onnx.load(str(model_dir / "1" / "model.onnx")), model_config_pb2)
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [-1, 5])]
    assert (model_dir / "labels.txt").read_text().splitlines() == list(load_manifest(folder).labels)
    texts = ["Ada Lovelace lived in London.", "x", "Zürich 東京"]
    feed = _client_inputs(folder, texts, token_types=False)
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], feed)
    for row, expected in enumerate(TokenClassifier(folder).logits(texts)):
        np.testing.assert_allclose(logits[row, : len(expected)], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["qa", pytest.param("multiple_choice", marks=pytest.mark.slow),
                                     pytest.param("fill_mask", marks=pytest.mark.slow)])
def test_task_graph_configs_match_their_graphs(fixture: str, request: pytest.FixtureRequest,
                                               model_config_pb2: ModuleType, tmp_path: Path) -> None:
    """config.pbtxt for the question-answering (start and end logits), multiple-choice (a choices axis) and
    fill-mask (the mask_positions input) graphs, written from their manifests by the export's function, against
    their ONNX graphs; none has classifier labels to attach."""
    from deberta_onnx.export._triton import write_triton_repository

    folder = request.getfixturevalue(fixture)[1]
    manifest = load_manifest(folder)
    (tmp_path / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
    write_triton_repository(tmp_path, name=fixture, model_files=["model.onnx"], inputs=manifest.inputs,
                            outputs=manifest.outputs, labels=manifest.labels, max_batch_size=8, max_queue_delay_us=0)
    model_dir = tmp_path / "triton" / fixture
    config = _parse(model_dir / "config.pbtxt", model_config_pb2)
    _check_against_graph(config, onnx.load(str(folder / "model.onnx")), model_config_pb2)
    assert not (model_dir / "labels.txt").exists() and not any(o.label_filename for o in config.output)
