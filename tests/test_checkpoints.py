"""Checkpoints the project writes in Hugging Face layout (``build_random_checkpoint``) load as other tools load
them: transformers' ``AutoTokenizer`` and ``AutoModel``, and sentence-transformers, from any working directory
and without sentencepiece installed, with SentencePiece's ids. This file runs in the main suite (the newest
transformers) and in ``.ci/compat export-floor`` (the oldest the project supports); the classifier checkpoints
built in ``conftest.py`` load in sentence-transformers' ``CrossEncoder`` in ``test_classifiers.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np

from deberta_onnx.runtime import Encoder

from .conftest import HARD_TEXTS

# A child process to which sentencepiece looks uninstalled (None in sys.modules: find_spec gives None, import
# fails), working in an empty folder: AutoTokenizer must find the checkpoint's files by the folder's path alone
# and need nothing but tokenizers.
_AUTOTOKENIZER = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["sentencepiece"] = None
    folder, workdir, texts = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())
    os.chdir(workdir)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pair = tokenizer("a b", "c d")
    print(json.dumps({"fast": tokenizer.is_fast, "ids": [tokenizer(text)["input_ids"] for text in texts],
                      "pair": [pair["input_ids"], pair["token_type_ids"]], "pad": tokenizer.pad_token_id,
                      "mask": tokenizer("[MASK]")["input_ids"], "max_length": tokenizer.model_max_length}))
    """
)


def _texts(corpus: list[str]) -> list[str]:
    return [*HARD_TEXTS[:-1], *corpus[:20]]


def test_autotokenizer_loads_from_anywhere_without_sentencepiece(tiny_checkpoint: Path, tmp_path: Path,
                                                                 corpus: list[str]) -> None:
    import sentencepiece as spm

    texts = _texts(corpus)
    result = subprocess.run([sys.executable, "-c", _AUTOTOKENIZER, str(tiny_checkpoint), str(tmp_path)],
                            input=json.dumps(texts), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["fast"] is True and loaded["pad"] == 0 and loaded["max_length"] == 512
    assert loaded["mask"] == [1, 4, 2]  # special tokens in the text are matched whole, as transformers does
    processor = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "spm.model"))
    for text, ids in zip(texts, loaded["ids"]):
        assert ids == [1, *processor.encode(text), 2], text
    a, b = processor.encode("a b"), processor.encode("c d")
    assert loaded["pair"] == [[1, *a, 2, *b, 2], [0] * (len(a) + 2) + [1] * (len(b) + 1)]


def test_the_readme_pytorch_pipeline_gives_the_runtime_vectors(tiny_checkpoint: Path, tiny_model: Path,
                                                               corpus: list[str]) -> None:
    """README, "The PyTorch code it replaces": AutoTokenizer, AutoModel and a masked mean, on the checkpoint itself."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = [*_texts(corpus), HARD_TEXTS[-1]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModel.from_pretrained(tiny_checkpoint).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    vectors = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()
    np.testing.assert_allclose(Encoder(tiny_model).encode(texts, batch_size=8), vectors, atol=1e-4, rtol=0)


def test_sentence_transformers_loads_it_as_a_mean_pooling_model(tiny_checkpoint: Path, tiny_model: Path,
                                                                corpus: list[str]) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [*_texts(corpus), HARD_TEXTS[-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No sentence-transformers model found": it adds mean pooling
        model = SentenceTransformer(str(tiny_checkpoint), device="cpu")
        expected = model.encode(texts, batch_size=8, convert_to_numpy=True)
    assert model.max_seq_length == 512
    np.testing.assert_allclose(Encoder(tiny_model).encode(texts, batch_size=8), expected, atol=1e-4, rtol=0)
