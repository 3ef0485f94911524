"""`Tokenizer(dir)` on byte-level BPE `tokenizer.json` directories against transformers' AutoTokenizer.

The tests build the tokenizers themselves (nothing is downloaded): a LLaMA-3-style one (split regex + byte
level, a post-processor that adds <|begin_of_text|>, three EOS ids in generation_config.json) and a
Qwen2.5-style one (no BOS, tokenizer_class Qwen2Tokenizer, pad token).
"""
import json
import random

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fastmath.tokenizer import Tokenizer  # noqa: E402
from family_util import CORPUS, make_llama3, make_qwen2  # noqa: E402 (shared builders)

STRINGS = CORPUS[:3] + CORPUS[-4:] + [
    "", " ", "\n\n", "12345678901234567890", "x" * 50, "The answer is: \\boxed{42}", "a<|eot_id|>b",
    "<|begin_of_text|>already has a BOS", "Hello , world ! isn 't it ?", "🙂🙃 mixed 中文 and café", "\u00a0nbsp",
    "trailing space ", "tab\tand\nnewline", "<|im_start|>user\nhi<|im_end|>",
    "cafe\u0301 (NFD)",
]


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    eos = (make_llama3 if request.param == "llama3" else make_qwen2)(path)
    return request.param, Tokenizer(path), transformers.AutoTokenizer.from_pretrained(path), eos


def test_ids_match_transformers_with_and_without_special_tokens(pair):
    kind, tok, ref, _ = pair
    assert tok.kind == "tokenizers" and tok.vocab_size == len(ref)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id,
                                                    ref.pad_token_id if ref.pad_token_id is not None else tok.eos_id)
    for s in STRINGS:
        assert tok.encode(s) == ref(s).input_ids, s
        assert tok.encode(s, bos=False) == ref(s, add_special_tokens=False).input_ids, s
        assert tok.encode(s, bos=False, eos=True) == ref(s, add_special_tokens=False).input_ids + [ref.eos_token_id]
    assert tok.encode_batch(STRINGS) == ref(STRINGS).input_ids
    if kind == "llama3":
        assert tok.encode("hi")[0] == tok.bos_id  # the post-processor's BOS
    else:
        assert tok.bos_id is None and tok.encode("hi") == tok.encode("hi", bos=False)


def test_decode_matches_transformers_skip_special_tokens(pair):
    _, tok, ref, _ = pair
    rng = random.Random(0)
    for s in STRINGS:
        ids = ref(s).input_ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), s
    for _ in range(200):  # arbitrary id sequences, including cut UTF-8 sequences and special tokens
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids


def test_eos_is_the_generation_config_set(pair):
    kind, tok, _, eos = pair
    assert tok.eos_ids == frozenset(eos) | {tok.eos_id}
    if kind == "llama3":
        assert len(tok.eos_ids) == 3  # <|end_of_text|>, <|eom_id|>, <|eot_id|> as LLaMA-3.1-Instruct


def test_token_bytes_on_byte_level_and_sentencepiece(pair, tmp_path):
    _, tok, _, _ = pair
    for s in ("The answer is: 42\n", "café 🙂\n\n"):
        ids = tok.encode(s, bos=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == s.encode()
    newline = [i for i in range(tok.vocab_size) if b"\n" in tok.token_bytes(i)]
    assert newline and all("\n" in tok._hf.decode([i]) for i in newline)
    from fastmath.tokenizer import train_tokenizer

    sp = train_tokenizer(CORPUS, tmp_path / "sp.model", vocab_size=400)
    ids = sp.encode("The answer is: 42\nok", bos=False)
    assert b"".join(sp.token_bytes(i) for i in ids) == b" The answer is: 42\nok"  # SentencePiece's dummy prefix


def test_bad_tokenizer_directories(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
        Tokenizer(tmp_path)
    make_qwen2(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not a token"):
        Tokenizer(tmp_path)


def make_sentencepiece_style(path, **config):
    """A LLaMA-2 / Mistral v0.3 style tokenizer.json: BPE with byte fallback and "▁" spaces (the legacy
    Prepend/Replace normaliser those files carry), class LlamaTokenizer."""
    from tokenizers import Tokenizer as T, decoders, models, normalizers, processors, trainers

    tok = T(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **config}))


@pytest.mark.parametrize("config", [{"legacy": False}, {"legacy": True}, {"add_prefix_space": False}])
def test_sentencepiece_style_tokenizer_json_as_transformers_builds_it(tmp_path, config):
    """transformers builds a LlamaTokenizer's pre-tokenizer from the class (Metaspace), not from the file."""
    make_sentencepiece_style(tmp_path, **config)
    tok, ref = Tokenizer(tmp_path / "tokenizer.json"), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(ref).__name__ == "LlamaTokenizer"
    for s in STRINGS:
        assert tok.encode(s) == ref(s).input_ids, s
        assert tok.encode(s, bos=False) == ref(s, add_special_tokens=False).input_ids, s
        assert tok.decode(ref(s).input_ids) == ref.decode(ref(s).input_ids, skip_special_tokens=True), s
    assert tok.token_bytes(tok.encode("\n", bos=False)[-1]) == b"\n"  # the <0x0A> byte piece


def test_engine_stops_on_a_byte_level_tokenizer(pair):
    """Every id of the EOS set ends a sample, and the answer line and stop strings are found on byte-level
    tokens (`Ċ` newlines, `Ġ` spaces), not only on SentencePiece pieces."""
    from test_sampler import ScriptModel

    from fastmath.engine import Engine, SamplingParams

    _, tok, _, eos = pair
    body = tok.encode("Mia has 3 apples.\nThe answer is: 42\nmore", bos=False)
    prompt = tok.encode("Question: x", bos=True) or tok.encode("Question: x", bos=False)
    assert any(tok.token_bytes(i) == b"\n" or b"\n" in tok.token_bytes(i) for i in body)
    for k, stop_id in enumerate(sorted(tok.eos_ids)):  # each EOS of the set, and none of them without ignore
        script = body + [stop_id] + tok.encode(" filler" * 30, bos=False)
        e = Engine(ScriptModel(tok.vocab_size, script, len(prompt)), tok, max_slots=8, max_model_len=200)
        reqs = {"eos": SamplingParams(n=1, max_new_tokens=60, stop_at_answer=False),
                "answer": SamplingParams(n=1, max_new_tokens=60),
                "string": SamplingParams(n=1, max_new_tokens=60, stop_at_answer=False, stop_strings=("apples",))}
        for rid, p in reqs.items():
            e.add_request(rid, prompt, p)
        done = {}
        while e.has_unfinished():
            for o in e.step():
                done.update({o.request_id: s for s in o.outputs if s.finished})
        assert (done["eos"].stop_reason, done["eos"].token_ids) == ("eos", body + [stop_id]), k
        assert done["eos"].text == tok.decode(body)
        assert (done["answer"].stop_reason, done["answer"].text) == ("answer", "Mia has 3 apples.\nThe answer is: 42")
        assert (done["string"].stop_reason, done["string"].text) == ("apples", "Mia has 3 ")
        # stopped at the token that completed the line / the string, not later at EOS
        assert tok.decode(done["answer"].token_ids).endswith("42\n") and len(done["answer"].token_ids) < len(body)
        assert tok.decode(done["string"].token_ids).endswith("apples")
