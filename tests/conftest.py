import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

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
    from fastmath.synth.procedural import generate
    from fastmath.tokenizer import train_tokenizer

    recs = generate(300)
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_tokenizer([r["question"] + "\n" + r["solution"] for r in recs], path, vocab_size=400)
