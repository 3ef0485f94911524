"""The server's text handling without a server: the incremental detokenizer (UTF-8 characters never split, stop
strings held back, deltas add up to the full decode), special-token aware encoding, chat rendering, and the
request validation of fastmath.serve.protocol."""
import sys

import pytest

from fastmath.data import render_prompt
from fastmath.serve.protocol import APIError, ChatMessage, CompletionRequest, check_completion, prompt_list
from fastmath.serve.text import IncrementalDetokenizer, encode_text, render_chat, stop_holdback
from fastmath.synth.procedural import SMALL_CONFIG, generate
from fastmath.tokenizer import train_tokenizer

TEXT = "Größe 12 € und 漢字 plus 7: The answer is: 19\nDone 🙂 ok"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    recs = generate(200, SMALL_CONFIG)
    return train_tokenizer([r["question"] + "\n" + r["solution"] for r in recs],
                           tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=400)


def test_byte_fallback_characters_span_several_tokens_in_this_tokenizer(tok):
    ids = tok.encode(TEXT, bos=False)
    assert tok.decode(ids) == TEXT
    assert sum(tok.id_to_piece(i).startswith("<0x") for i in ids) >= 8  # the test below really splits characters


@pytest.mark.parametrize("stops", [(), ("answer is",), ("\n",), ("漢字",), ("Done 🙂 ok",), ("xyz", " 19\nD")])
def test_incremental_detokenizer_deltas_add_up_and_hold_back(tok, stops):
    ids = tok.encode(TEXT, bos=False)
    full = tok.decode(ids)
    cut = min([full.find(s) for s in stops if s in full] + [len(full)])
    d = IncrementalDetokenizer(tok, stops)
    sent = ""
    for t in ids:
        delta = d.add([t])
        assert "\ufffd" not in delta  # never half a character
        sent += delta
        assert full.startswith(sent) and len(sent) <= cut  # never text from a stop string on
        # what is held back is only an incomplete character or what could still start a stop string
        held = tok.decode(d.ids).rstrip("\ufffd")[len(sent):]
        assert held == "" or len(sent) == cut or any(s.startswith(held) for s in stops), (sent, held)
    sent += d.finish(full[:cut])
    assert sent == full[:cut]


def test_holdback_is_the_longest_possible_stop_prefix():
    assert stop_holdback("abc The ans", ["The answer"]) == 7
    assert stop_holdback("abc", ["cd", "bcx"]) == 2
    assert stop_holdback("abc", ["x"]) == 0
    assert stop_holdback("", ["ab"]) == 0


def test_encode_text_matches_the_tokenizer_and_parses_special_tokens(tok):
    s = "Tom has 5 apples."
    assert encode_text(tok, s) == tok.encode(s, bos=True)
    assert encode_text(tok, s, add_bos=False) == tok.encode(s, bos=False)
    assert encode_text(tok, "</s>", add_bos=False) == [tok.eos_id]
    assert encode_text(tok, "a</s>b", add_bos=False) == tok.encode("a", bos=False) + [tok.eos_id] + \
        tok.encode("b", bos=False)


def test_chat_rendering_is_the_training_template():
    user = [ChatMessage(role="user", content="  What is 2+2? ")]
    assert render_chat(user, "vicuna") == render_prompt("What is 2+2?", "vicuna")
    assert render_chat(user, "plain") == render_prompt("What is 2+2?", "plain")
    parts = [ChatMessage(role="user", content=[{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}])]
    assert render_chat(parts, "vicuna") == render_prompt("What is 2+2?", "vicuna")
    conv = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"),
            ChatMessage(role="assistant", content="Hello."), ChatMessage(role="user", content="2+2?")]
    assert render_chat(conv, "vicuna") == "Be brief. USER: Hi ASSISTANT: Hello.</s> USER: 2+2? ASSISTANT:"
    for bad, template in [(conv, "plain"), (conv[:3], "vicuna"), ([conv[1], conv[1]], "vicuna"),
                          ([conv[1], conv[0]], "vicuna")]:
        with pytest.raises(APIError) as e:
            render_chat(bad, template)
        assert e.value.status == 400 and e.value.param == "messages"


def test_prompt_forms_and_completion_checks():
    assert prompt_list("a") == (["a"], False)
    assert prompt_list(["a", "b"]) == (["a", "b"], False)
    assert prompt_list([1, 2]) == ([[1, 2]], True)
    assert prompt_list([[1], [2, 3]]) == ([[1], [2, 3]], True)
    for kw, param in [({"n": 0}, "n"), ({"temperature": -1}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
                      ({"logprobs": 21}, "logprobs"), ({"best_of": 3}, "best_of"), ({"prompt": []}, "prompt"),
                      ({"stream": True, "logprobs": 1}, "logprobs"), ({"top_p": 1.5}, "top_p")]:
        req = CompletionRequest(**{"prompt": "x", **kw})
        with pytest.raises(APIError) as e:
            check_completion(req)
        assert e.value.status == 400 and e.value.param == param
    check_completion(CompletionRequest(prompt="x", max_tokens=0, echo=True))  # scoring only


def test_serve_command_names_the_extra_when_fastapi_is_missing_and_a_bad_model_dir(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from fastmath.cli import main

    res = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "no such run or checkpoint directory" in res.output
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    res = CliRunner().invoke(main, ["serve", "--model", str(tmp_path)])
    assert res.exit_code == 1 and "pip install 'fastmath[serve]'" in res.output
