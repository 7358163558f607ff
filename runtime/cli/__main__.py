"""``python -m deberta_onnx.runtime.cli``: the ``deberta-onnx`` command."""

import sys

from . import main

sys.exit(main())
