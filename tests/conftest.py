"""Fixtures: tiny random DeBERTa-v2 checkpoints and a SentencePiece tokenizer trained on the spot.

Nothing here downloads anything. The weights are random: good for parity and speed, meaningless as embeddings.

``pytest --stored-model`` runs where the export extra (torch) is not installed, as the runtime floor job does
(``.ci/compat runtime-floor``): ``tiny_model`` is then the fp32 graph of the folder committed under
``tests/data`` (exported by this version, ``tests/data/build_stored_model.py``) instead of a fresh export, and
every test that needs a checkpoint is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .trace_cache import ENV, Tally, TraceCache

_MEMO = pytest.StashKey[TraceCache]()
_TALLY = pytest.StashKey[Tally]()  # under pytest-xdist, on the controller: the workers' memos added up

# A model folder exported by an earlier run of this version, committed with what PyTorch computed for it
# (tests/test_stored_model.py). Named after its manifest version: a new version adds a folder, never replaces one.
STORED_MODEL = Path(__file__).parent / "data" / "manifest-v1"
# What build_random_checkpoint writes for the tokenizer, to copy into checkpoints built from its weights.
TOKENIZER_FILES = ("spm.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Texts that stress tokenization and padding: accents, CJK, emoji (inside and outside the vocabulary),
# rare symbols, very long words, whitespace runs, and lengths from one token to past the maximum.
HARD_TEXTS = [
    "Hello world.",
    "café naïve façade résumé Zürich",
    "東京タワーと北京の天安門",
    "emoji 😀🎉👍🏽 ❤️ 🇫🇷",
    "Ω ≈ ç √ ∫ ∑ π ≤ ≥ ∞",
    "  leading and   inner   spaces\tand\ttabs\nand newlines  ",
    "Donaudampfschifffahrtsgesellschaftskapitänswitwe" * 3,
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a",
    "",
    "ALL CAPS SHOUTING!!!",
    "mixed 123,456.78 €50 £3 ¥900 100km/h 37°C 5µm",
    "Ünïcödé ñ ß ø å æ œ",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया",
    "x" * 3000,
]

# Tiny DeBERTa-v2 configurations covering the attention variants: shared and separate relative-position
# keys, both disentangled terms, small position buckets, a conv layer (v2 style), and no relative attention.
_BASE = {
    "vocab_size": 4000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 64, "max_position_embeddings": 512, "type_vocab_size": 0, "pad_token_id": 0,
    "hidden_act": "gelu", "layer_norm_eps": 1e-7,
}
TINY_CONFIGS = {
    "v3-shared": {**_BASE, "relative_attention": True, "position_buckets": 8, "max_relative_positions": -1,
                  "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "norm_rel_ebd": "layer_norm",
                  "position_biased_input": False},
    "v3-separate": {**_BASE, "relative_attention": True, "position_buckets": 16, "max_relative_positions": 64,
                    "pos_att_type": ["c2p", "p2c"], "share_att_key": False, "norm_rel_ebd": "none",
                    "position_biased_input": False},
    "v2-conv": {**_BASE, "relative_attention": True, "position_buckets": 32, "max_relative_positions": -1,
                "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "norm_rel_ebd": "layer_norm",
                "position_biased_input": True, "conv_kernel_size": 3, "conv_act": "gelu"},
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stored-model", action="store_true",
                     help="use the model folder committed under tests/data as tiny_model and skip the tests that "
                          "need a checkpoint: for environments without the export extra (torch)")


def _stored_only(config: pytest.Config) -> bool:
    return bool(config.getoption("--stored-model"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from deberta_onnx.runtime.session import cuda_available

    skip_gpu = pytest.mark.skip(reason="needs onnxruntime-gpu with a working CUDA device")
    skip_fresh = pytest.mark.skip(reason="edits what today's export writes, which the stored folder predates "
                                         "(not run with --stored-model)")
    for item in items:
        if "gpu" in item.keywords and not cuda_available():
            item.add_marker(skip_gpu)
        if "fresh_export" in item.keywords and _stored_only(config):
            item.add_marker(skip_fresh)


def _worker() -> str | None:
    """This process's pytest-xdist worker id (``gw0``, ...), or ``None`` outside xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER")


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """Under pytest-xdist, the folder that the workers of this run share (beside their own temporary folders,
    which are ``pytest-N/popen-gwK``); ``None`` outside xdist."""
    if _worker() is None:
        return None
    root = tmp_path_factory.getbasetemp().parent / "shared"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session", autouse=True)
def trace_memo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TraceCache | None]:
    """The session's memo of dynamo traces (``tests/trace_cache.py``), in place of the exporter's ``export_onnx``
    for in-process exports; ``None`` where the export extra is not installed. Under pytest-xdist the workers share
    their traces through a folder."""
    if _stored_only(request.config):
        yield None
        return
    from deberta_onnx.export import _export

    root = _shared_root(tmp_path_factory)
    memo = TraceCache(_export.export_onnx, None if root is None else root / "traces")
    _export.export_onnx = memo  # type: ignore[assignment]
    request.config.stash[_MEMO] = memo
    try:
        yield memo
    finally:
        _export.export_onnx = memo.export_onnx  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _trace_afresh_under_monkeypatch(request: pytest.FixtureRequest, trace_memo: TraceCache | None) -> Iterator[None]:
    """A test that patches anything traces every export and keeps none: the memo's key cannot see a patched
    module-level function."""
    if trace_memo is None or "monkeypatch" not in request.fixturenames:
        yield
        return
    with trace_memo.off():
        yield


def _tally(config: pytest.Config) -> Tally | None:
    """The memo's tally for the whole run: this process's, or on a pytest-xdist controller the workers' summed."""
    memo = config.stash.get(_MEMO, None)
    return memo.tally if memo is not None else config.stash.get(_TALLY, None)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller, as each worker finishes: adds up what the workers' memos did."""
    counts = getattr(node, "workeroutput", {}).get("trace_memo")
    if counts is not None:
        node.config.stash.setdefault(_TALLY, Tally()).add(counts)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A memo that silently stops working costs the suite most of its speed: the session fails instead (judged
    once, on the whole run: under pytest-xdist the workers send their tallies to the controller)."""
    memo = session.config.stash.get(_MEMO, None)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        if memo is not None:
            workeroutput["trace_memo"] = memo.tally.to_dict()
        return
    tally = _tally(session.config)
    if tally is not None and tally.failure() is not None and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    tally = _tally(config)
    if tally is not None:
        terminalreporter.write_line(f"export traces: {tally.traced} traced, {tally.reused} reused within the run, "
                                    f"{tally.uncacheable} not cacheable ({ENV}=0 traces every export)")
        failure = tally.failure()
        if failure is not None:
            terminalreporter.write_line(f"FAILED: the trace memo is off: {failure}", red=True, bold=True)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    from deberta_onnx.runtime.sentences import shipped_sentences

    return shipped_sentences()


def _skip_without_export(config: pytest.Config) -> None:
    if _stored_only(config):
        pytest.skip("needs a checkpoint, which needs the export extra (not run with --stored-model)")


# Checkpoints and exports, made once a run by what they are made from. pytest tears a parametrized session
# fixture down when the tests move on to another of its parameters and sets it up again when they come back
# (``exported`` is used by several files), and ``tiny_model`` is the plain export of the checkpoint that ``exported``
# has for v3-shared: each would otherwise trace the graph again (some 20 s of a CPU each). Under pytest-xdist the
# workers share them too: the first to need one makes it under a file lock in the run's shared folder, and the
# others wait for it and read it. Tests must not change these folders (copy one to change it).
_MADE: dict[str, Path] = {}


def _once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder ``name``, which ``make(folder)`` fills, made once a run (``name`` says what it is made from)."""
    if name in _MADE:
        return _MADE[name]
    root = _shared_root(tmp_path_factory)
    if root is None:
        out = tmp_path_factory.mktemp(name)
        make(out)
    else:
        from filelock import FileLock

        out, done = root / name, root / f"{name}.done"
        with FileLock(root / f"{name}.lock"):
            if not done.exists():
                shutil.rmtree(out, ignore_errors=True)  # a worker that failed half-way
                out.mkdir()
                make(out)
                done.touch()
    _MADE[name] = out
    return out


def _checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus: list[str], name: str) -> Path:
    from deberta_onnx.export.testing import build_random_checkpoint

    return _once(tmp_path_factory, f"ckpt-{name}",
                 lambda out: build_random_checkpoint(TINY_CONFIGS[name], out, texts=corpus, seed=1))


def _plain_export(tmp_path_factory: pytest.TempPathFactory, src: Path) -> Path:
    """The folder ``export_model`` writes from ``src`` (one of ``_once``'s folders) with the default settings."""
    return _once(tmp_path_factory, f"export-{src.name}", lambda out: _export(src, out / "model")) / "model"


# The quick tier (``-m "not slow"``) takes v3-shared alone; the other attention variants run the same modules.
@pytest.fixture(scope="session", params=[name if name == "v3-shared" else pytest.param(name, marks=pytest.mark.slow)
                                         for name in sorted(TINY_CONFIGS)])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    """Each tiny checkpoint in turn."""
    _skip_without_export(request.config)
    return _checkpoint(tmp_path_factory, corpus, request.param)


@pytest.fixture(scope="session")
def tiny_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    corpus: list[str]) -> Path:
    """One tiny checkpoint, for tests that need any."""
    _skip_without_export(request.config)
    return _checkpoint(tmp_path_factory, corpus, "v3-shared")


def _export(src: Path, out: Path) -> Path:
    from deberta_onnx.export import ExportConfig, export_model

    export_model(src, out, ExportConfig(quiet=True))
    return out


@pytest.fixture(scope="session")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder) for each tiny checkpoint."""
    return checkpoint, _plain_export(tmp_path_factory, checkpoint)


@pytest.fixture(scope="session")
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model folder exported from ``tiny_checkpoint``; with ``--stored-model``, the stored one (fp32 only)."""
    if _stored_only(request.config):
        return _stored_fp32(tmp_path_factory.mktemp("stored-tiny") / "model")
    tiny_checkpoint = request.getfixturevalue("tiny_checkpoint")
    return _plain_export(tmp_path_factory, tiny_checkpoint)


def _stored_fp32(out: Path) -> Path:
    """A copy of the stored folder holding its fp32 graph alone, as the plain export that ``tiny_model`` is: the
    runtime would otherwise pick the int8 variant, whose vectors move with the batch."""
    shutil.copytree(STORED_MODEL / "model", out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for name, variant in list(manifest["variants"].items()):
        if name != manifest["default_variant"]:
            del manifest["variants"][name]
            manifest["files"].pop(variant["file"])
            (out / variant["file"]).unlink()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
NLI_LABELS = ["entailment", "neutral", "contradiction"]


def build_classifier_checkpoint(tiny_checkpoint: Path, out: Path, *, task: str, labels: list[str],
                                type_vocab_size: int = 0, seed: int = 3) -> Path:
    """A tiny DeBERTa-v2 sequence or token classifier (or question-answering head) with random weights and the tiny
    checkpoint's tokenizer.

    The head is re-drawn with unit-scale weights: at transformers' initialisation (std 0.02) every logit is
    about 1e-3, too small for a 1e-4 parity check to mean anything."""
    import torch
    import transformers
    from transformers import DebertaV2Config

    config = DebertaV2Config(**{**TINY_CONFIGS["v3-shared"], "type_vocab_size": type_vocab_size},
                             id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    head = {"sequence-classification": "ForSequenceClassification", "token-classification": "ForTokenClassification",
            "question-answering": "ForQuestionAnswering"}[task]
    loader = getattr(transformers, f"DebertaV2{head}")
    torch.manual_seed(seed)
    model = loader(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(("classifier.", "pooler.", "qa_outputs.")):
                parameter.normal_(0.0, 0.3) if name.endswith("weight") else parameter.zero_()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / name, out / name)
    return out


def _classifier(tmp_path_factory: pytest.TempPathFactory, name: str,
                build: Callable[[Path], Path]) -> tuple[Path, Path]:
    """(checkpoint, model folder): ``build(base)`` writes a checkpoint, exported beside it, once a run."""
    from deberta_onnx.export import ExportConfig, export_model

    def make(base: Path) -> None:
        # transformers' tokenizer, so that PyTorch references tokenize exactly alike (docs/export.md, "Tokenization").
        export_model(build(base), base / "model", ExportConfig(quiet=True, tokenizer="transformers"))

    base = _once(tmp_path_factory, name, make)
    return base / "ckpt", base / "model"


@pytest.fixture(scope="session")
def nli(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder): a sequence classifier with three labels and no token types (as DeBERTa-v3)."""
    return _classifier(tmp_path_factory, "nli", lambda base: build_classifier_checkpoint(
        tiny_checkpoint, base / "ckpt", task="sequence-classification", labels=NLI_LABELS))


@pytest.fixture(scope="session")
def reranker(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder): a one-label cross-encoder with token type embeddings (type_vocab_size 2)."""
    return _classifier(tmp_path_factory, "reranker", lambda base: build_classifier_checkpoint(
        tiny_checkpoint, base / "ckpt", task="sequence-classification", labels=["LABEL_0"], type_vocab_size=2, seed=3))


@pytest.fixture(scope="session")
def qa(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder): an extractive question-answering head (start and end logits), fp32 only."""
    return _classifier(tmp_path_factory, "qa", lambda base: build_classifier_checkpoint(
        tiny_checkpoint, base / "ckpt", task="question-answering", labels=["LABEL_0", "LABEL_1"], seed=7))


@pytest.fixture(scope="session")
def ner(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder): a token classifier with IOB labels."""
    return _classifier(tmp_path_factory, "ner", lambda base: build_classifier_checkpoint(
        tiny_checkpoint, base / "ckpt", task="token-classification", labels=NER_LABELS, seed=5))


@pytest.fixture(scope="session")
def sbert(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sentence-transformers folder, model folder): the tiny checkpoint saved by sentence-transformers with mean
    pooling, exported with transformers' tokenizer (so both tokenize alike) and the token vectors output. The
    PyTorch reference for the sentence-transformers call shape and the integrations."""
    import warnings

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    from deberta_onnx.export import ExportConfig, export_model

    def make(base: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stack = [modules.Transformer(str(tiny_checkpoint), max_seq_length=128),
                     modules.Pooling(32, pooling_mode="mean")]
            SentenceTransformer(modules=stack, device="cpu").save(str(base / "st"))
        export_model(base / "st", base / "model",
                     ExportConfig(quiet=True, tokenizer="transformers", token_embeddings=True))

    base = _once(tmp_path_factory, "sbert", make)
    return base / "st", base / "model"


@pytest.fixture(scope="session")
def every_variant_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint, default graph, every precision, the token vectors output too (what transformers.js
    reads); once a session (the Node and OpenVINO tests share it)."""
    from deberta_onnx.export import ExportConfig, export_model

    config = ExportConfig(precisions=("fp16", "int8-dynamic", "int8-static"), token_embeddings=True,
                          validation_shapes=((2, 5), (3, 17)), quiet=True)
    return _once(tmp_path_factory, "every-variant",
                 lambda out: export_model(tiny_checkpoint, out / "model", config)) / "model"


@pytest.fixture(scope="session")
def portable_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with ``portable=True`` (standard ONNX operators only), every precision, the
    token vectors output too; once a session (the portable tests and the Node tests share it)."""
    from deberta_onnx.export import ExportConfig, export_model

    config = ExportConfig(portable=True, precisions=("fp16", "int8-dynamic", "int8-static"), token_embeddings=True,
                          validation_shapes=((2, 5), (3, 17)), quiet=True)
    return _once(tmp_path_factory, "portable",
                 lambda out: export_model(tiny_checkpoint, out / "model", config)) / "model"


def build_head_checkpoint(tiny_checkpoint: Path, out: Path, *, head: str, type_vocab_size: int = 0, seed: int = 7,
                          encoder: Path | None = None) -> Path:
    """A tiny random DeBERTa-v2 ``DebertaV2ForMultipleChoice`` (``head="multiple-choice"``) or
    ``DebertaV2ForMaskedLM`` (``head="fill-mask"``, in the original DeBERTa layout ``lm_predictions.lm_head``, as
    the published v1/v2 checkpoints hold it) with the tiny checkpoint's tokenizer.

    As in ``build_classifier_checkpoint``, the head is re-drawn at unit scale; the masked LM's scores are the word
    embeddings' products with the last hidden state, so those are re-drawn wider too: at transformers'
    initialisation the 4000 token probabilities would all be about 1/4000, and top-k would order near-ties. The
    multiple-choice model's encoder matrices are re-drawn wider as well: at 0.02 its [CLS] vector hardly depends on
    the text, every choice would score within 1e-3 of the others, and the int8 quality gate, which compares the
    choices' logits centred per question, would measure rounding noise alone.

    ``encoder``: a checkpoint whose encoder weights (and config) to take instead, kept as they are (the outlier
    fixture: ``build_random_checkpoint(..., outliers=OutlierSpec())``); only the head is drawn."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM, DebertaV2ForMultipleChoice, DebertaV2Model

    config = DebertaV2Config(**{**TINY_CONFIGS["v3-shared"], "type_vocab_size": type_vocab_size},
                             legacy=False)
    if encoder is not None:
        config = DebertaV2Config.from_pretrained(encoder, legacy=False)
    torch.manual_seed(seed)
    masked = head == "fill-mask"
    model = (DebertaV2ForMaskedLM if masked else DebertaV2ForMultipleChoice)(config).eval()
    if encoder is not None:
        model.deberta.load_state_dict(DebertaV2Model.from_pretrained(encoder).state_dict())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(("classifier.", "pooler.", "lm_predictions.lm_head.dense.")):
                parameter.normal_(0.0, 0.3) if name.endswith("weight") else parameter.zero_()
            elif encoder is not None:
                continue
            elif masked and name == "deberta.embeddings.word_embeddings.weight":
                parameter.normal_(0.0, 0.5)
            elif not masked and name.startswith("deberta.encoder.layer.") and parameter.dim() == 2:
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy((encoder or tiny_checkpoint) / name, out / name)
    return out


@pytest.fixture(scope="session")
def multiple_choice(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder): a multiple-choice model (fp32), exported with transformers' tokenizer."""
    return _classifier(tmp_path_factory, "multiple-choice", lambda base: build_head_checkpoint(
        tiny_checkpoint, base / "ckpt", head="multiple-choice"))


@pytest.fixture(scope="session")
def fill_mask(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder): a masked LM (fp32), exported with transformers' tokenizer."""
    return _classifier(tmp_path_factory, "fill-mask", lambda base: build_head_checkpoint(
        tiny_checkpoint, base / "ckpt", head="fill-mask"))
