import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# transformers >= 5.25 depends on Hugging Face's `kernels` package and imports it, and the repository's top-level
# kernels/ directory (installed as fastmath.kernels) would shadow it: `python -m pytest` puts the repository root
# first on sys.path. Move it last (fastmath itself is installed, editable, so nothing else changes).
_root = [p for p in sys.path if os.path.abspath(p or os.curdir) == str(REPO)]
sys.path[:] = [p for p in sys.path if p not in _root] + _root

# Tests run on 2 shared cores: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def procedural_tok(tmp_path_factory):
    """A 400-piece SentencePiece tokenizer trained on 300 procedural problems (question + solution)."""
    from fastmath.synth.procedural import SMALL_CONFIG, generate
    from fastmath.tokenizer import train_tokenizer

    recs = generate(300, SMALL_CONFIG)
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_tokenizer([r["question"] + "\n" + r["solution"] for r in recs], path, vocab_size=400)
