"""The checkpoint's own chat template against transformers' apply_chat_template, on the real LLaMA-3.1-Instruct,
Mistral-7B-Instruct-v0.3 and Qwen2.5-Instruct template strings (tests/data/chat_templates/, copied verbatim from
their tokenizer_config.json). The tokenizers are the byte-level BPE ones tests/family_util.py builds."""
import json
from datetime import datetime

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fastmath.chat_template import ChatTemplateError, encode_chat, render_chat  # noqa: E402
from fastmath.tokenizer import Tokenizer  # noqa: E402
from family_util import CHAT_FAMILIES as FAMILIES, FIXTURES, make_chat_dir, make_mistral, make_qwen2  # noqa: E402

CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "  Reason step by step.  "}, {"role": "user", "content": "Solve $x^2 = 4$.\n"}],
    [{"role": "user", "content": "Sam has 3 apples."}, {"role": "assistant", "content": "OK."},
     {"role": "user", "content": "He buys 7 more. How many? ünïcödé 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b", "tool_calls": None}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def chat_dir(request, tmp_path_factory):
    path = make_chat_dir(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, path, Tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


def test_rendering_matches_apply_chat_template(chat_dir):
    name, _, tok, ref = chat_dir
    assert tok.chat_template == ref.chat_template
    for chat in CHATS:
        want = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert render_chat(tok.chat_template, chat, True, tok.special_tokens) == want
        assert render_chat(tok.chat_template, chat, False, tok.special_tokens) == \
            ref.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    if name.startswith("llama"):  # a template variable the caller may set
        assert "Today Date: 01 Jan 2030" in render_chat(tok.chat_template, CHATS[0], True, tok.special_tokens,
                                                        date_string="01 Jan 2030")


def test_encoding_matches_and_has_one_bos(chat_dir):
    name, _, tok, ref = chat_dir
    for chat in CHATS:
        ids = encode_chat(tok, chat)
        want = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert ids == want
        if tok.bos_id is not None:
            assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # the template's BOS, no second one
        else:
            assert name.startswith("qwen")


def test_template_refusals_are_clear_errors(chat_dir):
    name, _, tok, ref = chat_dir
    if name.startswith("mistral"):  # the template's own raise_exception
        bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(ChatTemplateError, match="roles must alternate"):
            render_chat(tok.chat_template, bad, True, tok.special_tokens)
        with pytest.raises(Exception, match="roles must alternate"):
            ref.apply_chat_template(bad, add_generation_prompt=True, tokenize=False)


def test_sandbox_helpers_and_escapes():
    assert render_chat("{{ strftime_now('%Y') }}", [{"role": "user", "content": ""}]) == str(datetime.now().year)
    assert render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "<&>"}]) == \
        '{"role": "user", "content": "<&>"}'  # transformers' tojson: no HTML escaping
    for evil in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% set ns = namespace() %}{% set ns._x = 1 %}",
                 "{{ messages.append(1) }}"):
        with pytest.raises(ChatTemplateError):
            render_chat(evil, [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="line 1"):
        render_chat("{% if %}", [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="boom"):
        render_chat("{{ raise_exception('boom') }}", [{"role": "user", "content": "hi"}])


def test_encode_chat_needs_a_template(tmp_path):
    make_qwen2(tmp_path)
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        encode_chat(Tokenizer(tmp_path), CHATS[0])


def test_sentencepiece_directory_encodes_with_its_tokenizer_json(tmp_path):
    """A directory with both files (Mistral v0.3) reads tokenizer.model, and encodes chats with tokenizer.json."""
    from fastmath.tokenizer import train_tokenizer

    make_mistral(tmp_path)
    train_tokenizer(["Sam has 3 apples and buys 7 more. How many?"] * 20, tmp_path / "tokenizer.model", vocab_size=290)
    fixture = json.loads((FIXTURES / "mistral-7b-instruct-v0.3.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **{k: fixture[k] for k in ("bos_token", "eos_token", "chat_template")}}))
    tok = Tokenizer(tmp_path)
    assert tok.kind == "sentencepiece" and tok.chat_template == fixture["chat_template"]
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    want = ref.apply_chat_template(CHATS[2], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert encode_chat(tok, CHATS[2]) == want
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ChatTemplateError, match="there is none"):
        encode_chat(tok, CHATS[0])


def test_sft_documents_of_toy_templates(tmp_path):
    """encode_sft_chats: a template that writes no special token after the answer gets the EOS appended (so a
    trained model still stops); one whose prompt is not a prefix of the conversation is refused, by name."""
    from fastmath.chat_template import chat_end_ids, encode_sft_chats

    make_qwen2(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    plain = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": plain}))
    tok, ref = Tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert chat_end_ids(tok) == frozenset()
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    [(ids, n)] = encode_sft_chats(tok, [("What is 2 + 3?", "5")])
    assert ids == ref.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] + [tok.eos_id]
    assert n == len(ref.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"])
    reordered = "{% if add_generation_prompt %}A: {% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": reordered}))
    with pytest.raises(ChatTemplateError, match="cannot be masked exactly"):
        encode_sft_chats(Tokenizer(tmp_path), [("What is 2 + 3?", "5")])
