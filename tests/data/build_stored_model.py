"""Writes ``tests/data/manifest-v1/``: a tiny model folder exported by this version, and what PyTorch computed.

    python -m tests.data.build_stored_model      # from the repository root; needs the export extra

``model/`` is the export of a tiny random DeBERTa-v3 checkpoint (2 layers, hidden size 32, 2,000 tokens) in
fp32 and int8-dynamic; ``reference.json`` holds the versions that made it, SentencePiece's ids for the hard
texts and the 400 shipped sentences (``tokenization``, one ``[text, ids]`` a line), and PyTorch's fp32 vectors
for some of them (``embedding``: SentencePiece ids, transformers' model, masked mean, as ``tests/reference.py``).
``tests/test_stored_model.py`` checks the runtime against it where no torch is installed (the runtime floor job,
``.ci/compat runtime-floor``) and in every later version: the folder must keep loading, or be refused with the
manifest-version error.

Rerun it only to replace the folder of the same manifest version (it is overwritten); when the manifest version
changes, keep this folder and write the new version's beside it (``STORED_MODEL`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from deberta_onnx.export import ExportConfig, export_model
from deberta_onnx.export.testing import build_random_checkpoint, shipped_sentences
from deberta_onnx.runtime.contract import MANIFEST_VERSION
from deberta_onnx.runtime.installed import installed_versions

from ..conftest import HARD_TEXTS, TINY_CONFIGS
from ..reference import reference_embeddings, reference_ids

OUT = Path(__file__).parent / f"manifest-v{MANIFEST_VERSION}"
# The tokenizer of the tests' tiny checkpoints (2,000 pieces at most), and an embedding table of that size (theirs
# has 4,000 rows): the folder stays under 2 MB.
VOCAB_SIZE = 2000
PRECISIONS = ("fp32", "int8-dynamic")


def main() -> None:
    corpus = shipped_sentences()
    tokenized = [*HARD_TEXTS, *corpus]
    embedded = [*HARD_TEXTS, *corpus[1::20]]
    with tempfile.TemporaryDirectory(prefix="stored-model-") as scratch:
        checkpoint = build_random_checkpoint({**TINY_CONFIGS["v3-shared"], "vocab_size": VOCAB_SIZE},
                                             Path(scratch) / "checkpoint", seed=1, texts=corpus,
                                             vocab_size=VOCAB_SIZE)
        shutil.rmtree(OUT, ignore_errors=True)
        export_model(checkpoint, OUT / "model", ExportConfig(quiet=True, precisions=PRECISIONS))
        ids, mask = reference_ids(checkpoint, tokenized)
        vectors = reference_embeddings(checkpoint, embedded)
    lengths = mask.sum(dim=1).tolist()
    sections = {
        "tokenization": [[text, row[: int(n)]] for text, row, n in zip(tokenized, ids.tolist(), lengths)],
        "embedding": [[text, [float(x) for x in row]] for text, row in zip(embedded, vectors)],
    }
    versions = installed_versions(("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers",
                                   "sentencepiece", "numpy"))
    # One entry a line, so that a rebuilt file diffs by text.
    body = ",\n".join(f' "{name}": [\n' + ",\n".join(f"  {json.dumps(item, ensure_ascii=False)}" for item in items)
                      + "\n ]" for name, items in sections.items())
    (OUT / "reference.json").write_text(f'{{\n "versions": {json.dumps(versions)},\n{body}\n}}\n', encoding="utf-8")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
