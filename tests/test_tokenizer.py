import sentencepiece as spm

from fastmath.tokenizer import Tokenizer, train_tokenizer

TEXTS = [f"Sam has {i} apples and buys {i * 3 + 7} more. How many apples does Sam have now? "
         f"The answer is: {i * 4 + 7}" for i in range(200)] + ["π ≈ 3.14159, √2 and ünïcödé"]


def test_trained_tokenizer_matches_raw_sentencepiece(tmp_path):
    tok = train_tokenizer(TEXTS, tmp_path / "tok.model", vocab_size=320)
    raw = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (320, 1, 2)
    assert tok.pad_id == 0  # LLaMA-2 has no pad token: fastmath uses <unk>
    for text in TEXTS[:5] + ["12345 + 678 = 13023", "emoji 🙂 falls back to bytes"]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids == [1] + raw.encode(text) + [2]
        assert tok.decode(ids) == raw.decode(raw.encode(text)) == text
    # LLaMA conventions: digits split, byte fallback pieces present.
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345", bos=False)]
    assert [p.strip("▁") for p in pieces if p.strip("▁")] == list("12345")
    assert tok.id_to_piece(3) == "<0x00>"


def test_tokenizer_errors(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="vocab_size 270 is too small"):
        train_tokenizer(TEXTS, tmp_path / "small.model", vocab_size=270)
    tok = train_tokenizer(TEXTS, tmp_path / "tok.model", vocab_size=310)
    with pytest.raises(ValueError, match="tokenizer has 310 tokens but the model has a vocabulary of 256"):
        tok.check_model_vocab(256)


def test_real_llama2_tokenizer(shared_data):
    path = shared_data / "llama2_tokenizer.model"
    tok = Tokenizer(path)
    raw = spm.SentencePieceProcessor(model_file=str(path))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    text = "Natalia sold clips to 48 of her friends in April. The answer is: 72"
    assert tok.encode(text) == [1] + raw.encode(text)
    assert tok.decode(tok.encode(text, eos=True)) == text
