"""Train, sample and serve each model family end to end with `--template chat`, against transformers.

Per family, a tiny random transformers checkpoint with a byte-level BPE tokenizer.json and the family's real chat
template (tests/family_util.py): LLaMA-3 (GQA, tied embeddings, llama3 rope scaling, BOS <|begin_of_text|>),
Mistral (MHA, BOS <s>, [INST] template, </s> ends a turn) and Qwen2 (GQA, q/k/v biases, no BOS, <|im_end|>).

- the training documents are transformers' `apply_chat_template([user, assistant])`, and exactly the tokens after
  `apply_chat_template([user], add_generation_prompt=True)` are targets (TRL's conversational SFT);
- `fastmath.train` a few steps with template "chat"; final/ reopens in transformers with equal logits, its
  tokenizer in AutoTokenizer with the same ids and chat template, and its generation_config stops on the
  template's end of turn;
- `fastmath sample` writes graded samples whose greedy answer is transformers' greedy `generate` of the same
  prompt; `fastmath serve` on the run (whose template, chat, is its default) answers a chat completion with that
  same greedy text.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_util import make_chat_dir, make_hf  # noqa: E402

from fastmath import data as D  # noqa: E402
from fastmath import train as T  # noqa: E402
from fastmath.checkpoint import load_model  # noqa: E402
from fastmath.tokenizer import Tokenizer  # noqa: E402

# family -> (tokenizer + chat template of family_util, model config of family_util, the end of turn the template
# writes, the base model's EOS). LLaMA-3.1-8B and Qwen2.5-7B (base) end text with another token than their chat
# template's end of turn: a chat-trained checkpoint must stop on both.
FAMILIES = {
    "llama3": ("llama3.1-8b-instruct", "llama3-gqa-tied", "<|eot_id|>", "<|end_of_text|>"),
    "mistral": ("mistral-7b-instruct-v0.3", "mistral-mha", "</s>", "</s>"),
    "qwen2": ("qwen2.5-instruct", "qwen2-gqa", "<|im_end|>", "<|endoftext|>"),
}
OPTS = {"procedural_examples": 60, "val_examples": 8, "eval_problems": 0,
        "micro_batch_tokens": 2048, "batch_tokens": 2048, "max_len": 2048, "max_steps": 2, "threads": 1,
        "progress": False, "lr": 1e-3, "warmup": 0.0, "cache_dir": "", "template": "chat"}
NEW = 10  # greedy tokens compared with transformers


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, base checkpoint dir, run dir of a finished 2-step --template chat run)."""
    torch.set_num_threads(1)
    name = request.param
    chat, kind, _, base_eos = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    base = make_chat_dir(chat, root / "base")
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": base_eos}))
    (base / "generation_config.json").unlink(missing_ok=True)
    ref = transformers.AutoTokenizer.from_pretrained(base)
    hf = make_hf(kind, vocab_size=len(ref), max_position_embeddings=4096)
    hf.config.bos_token_id, hf.config.eos_token_id = ref.bos_token_id, ref.eos_token_id
    hf.generation_config = transformers.GenerationConfig(bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id)
    hf.save_pretrained(base)
    summary = T.train(T.TrainConfig(model=str(base), out=str(root / "runs"), **OPTS))
    return name, base, Path(summary["run_dir"])


def test_chat_documents_mask_exactly_the_prompt(family):
    """tokenize_examples under "chat": the document is apply_chat_template([user, assistant]) and its targets are
    exactly the tokens after apply_chat_template([user], add_generation_prompt=True)."""
    name, base, _ = family
    ref = transformers.AutoTokenizer.from_pretrained(base)
    tok = Tokenizer(base)
    examples = [D.record_to_example(r) for r in (
        {"question": "Sam has 3 apples and buys 7 more. How many apples does Sam have now?", "answer": "3+7\n#### 10"},
        {"problem": "Let $x^2 + 3x = 10$. Find $x > 0$.", "solution": "Then $x = 2$, so \\boxed{2}."},
        {"question": "  ünïcödé 🙂 \n", "solution": "Keep it.", "answer": "1"})]
    docs = D.tokenize_examples(examples, tok, "chat")
    labels = D.flat_labels(docs)
    for i, e in enumerate(examples):
        user = [{"role": "user", "content": e.prompt.strip()}]
        prompt = ref.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = ref.apply_chat_template(user + [{"role": "assistant", "content": e.response}], tokenize=True,
                                       return_dict=True)["input_ids"]
        assert docs.doc(i).tolist() == full and int(docs.n_prompt[i]) == len(prompt)
        lab = labels[docs.offsets[i]:docs.offsets[i + 1]]
        assert [t for t in lab.tolist() if t != D.IGNORE] == full[len(prompt):]
        assert D.encode_prompt(tok, e.prompt, "chat") == prompt  # what sample and the trainer's evaluation feed
        end = ref.convert_tokens_to_ids(FAMILIES[name][2])
        assert end in full[len(prompt):]  # the answer ends with the template's end of turn, a target
        assert (full.count(ref.bos_token_id) == 1) if ref.bos_token_id is not None else name == "qwen2"
    # few-shot under "chat": the shots are earlier user/assistant turns of the same conversation
    from fastmath import sample_io as io

    problem = io.Problem(0, "p0", examples[0].prompt, "10", None, None)
    shots = io.fewshot_turns(2, {problem.question})
    want = ref.apply_chat_template(shots + [{"role": "user", "content": problem.question}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert len(shots) == 4 and io.encode_prompts(tok, [problem], "chat", fewshot=2) == [want]


def test_plain_templates_on_the_family_tokenizer(family):
    """Under vicuna/plain, a document is what transformers' tokenizer gives for the text "prompt response" plus
    tokenizer_config.json's EOS (TRL's prompt-completion form; a byte-level tokenizer has no dummy prefix, so
    the space is written), its first len(tokenizer(prompt)) tokens masked; Qwen2 documents start without BOS."""
    name, base, _ = family
    ref = transformers.AutoTokenizer.from_pretrained(base)
    tok = Tokenizer(base)
    examples = [D.record_to_example(r) for r in (
        {"question": "Sam has 3 apples and buys 7 more. How many?", "answer": "3+7\n#### 10"},
        {"text": "Plain text has no prompt."})]
    for template in ("vicuna", "plain"):
        docs = D.tokenize_examples(examples, tok, template)
        prompt = D.render_prompt(examples[0].prompt, template)
        assert docs.doc(0).tolist() == ref(prompt + " " + examples[0].response).input_ids + [ref.eos_token_id]
        assert int(docs.n_prompt[0]) == len(ref(prompt).input_ids) == len(D.encode_prompt(tok, examples[0].prompt,
                                                                                            template))
        assert docs.doc(1).tolist() == ref(examples[1].response).input_ids + [ref.eos_token_id]
        assert (docs.doc(0)[0] == ref.bos_token_id) if name != "qwen2" else ref.bos_token_id is None


def test_trained_final_reopens_in_transformers(family):
    name, base, run = family
    final = run / "final"
    assert not (final / "tokenizer.model").exists() and json.loads((run / "config.json").read_text())["config"]["template"] == "chat"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    fm = load_model(final, dtype=torch.float32).eval()
    before = load_model(base, dtype=torch.float32).eval()
    tokens = torch.randint(0, fm.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fm(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
        assert (fm(tokens) - before(tokens)).abs().max() > 1e-3  # it trained
    ref_base, ref = transformers.AutoTokenizer.from_pretrained(base), transformers.AutoTokenizer.from_pretrained(final)
    text = "Sam has 3 apples.\nThe answer is: 3"
    assert ref(text).input_ids == ref_base(text).input_ids == Tokenizer(final).encode(text)
    assert ref.chat_template == ref_base.chat_template is not None
    end, base_eos = (ref.convert_tokens_to_ids(FAMILIES[name][k]) for k in (2, 3))
    eos = transformers.GenerationConfig.from_pretrained(final).eos_token_id
    assert Tokenizer(base).eos_ids == {base_eos}
    assert sorted(eos if isinstance(eos, list) else [eos]) == sorted({end, base_eos})  # the end of turn joined
    assert Tokenizer(final).eos_ids == {end, base_eos}


def hf_greedy(hf, ref, question: str) -> str:
    """transformers' greedy continuation (NEW tokens, its generation_config's EOS set) of the chat prompt."""
    ids = ref.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False, pad_token_id=ref.pad_token_id)[0, len(ids):]
    return ref.decode(out, skip_special_tokens=True)


def test_sample_and_serve_with_the_chat_template(family, tmp_path):
    pytest.importorskip("fastapi")
    from click.testing import CliRunner
    from serve_util import Server, http

    from fastmath.cli import main

    name, _, run = family
    final = run / "final"
    res = CliRunner().invoke(main, ["sample", "--model", str(final), "--template", "chat", "--n", "2", "--problems",
                                    "2", "--max-new-tokens", str(NEW), "--greedy", "--no-stop-at-answer",
                                    "--threads", "1", "--dtype", "fp32", "--out", str(tmp_path / "eval")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(len(r["completions"]) == 2 and len(r["verdicts"]) == 2 for r in recs)
    assert (tmp_path / "eval" / "summary.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ref = transformers.AutoTokenizer.from_pretrained(final)
    for r in recs:  # the prompt is transformers' apply_chat_template, token for token
        chat = [{"role": "user", "content": r["question"].strip()}]
        assert r["prompt_tokens"] == len(ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=True)["input_ids"])
    assert recs[0]["greedy_completion"] == hf_greedy(hf, ref, recs[0]["question"].strip())

    server = Server(run)  # the run directory: its final/, and its training template (chat) by default
    try:
        question = recs[1]["question"].strip()
        status, body = http("POST", server.base_url + "/chat/completions",
                            {"messages": [{"role": "user", "content": question}], "max_tokens": NEW,
                             "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == hf_greedy(hf, ref, question)
        if name == "mistral":  # a conversation the template itself refuses is a 400 with its message
            status, body = http("POST", server.base_url + "/chat/completions",
                                {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
            assert status == 400 and "roles must alternate" in body["error"]["message"], body
    finally:
        server.stop()


def test_chat_template_errors_are_clear(family, tmp_path):
    """--template chat needs a checkpoint with a chat template (a preset, or a directory without one, is refused
    by name); serve refuses it before opening a port."""
    _, base, _ = family
    with pytest.raises(ValueError, match="--template chat .* not the preset 'test'"):
        T.train(T.TrainConfig(model="test", out=str(tmp_path), **{**OPTS, "max_steps": 1}))
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in base.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"--template chat renders the checkpoint's own chat template, but {bare} has none"):
        T.train(T.TrainConfig(model=str(bare), out=str(tmp_path / "runs"), **{**OPTS, "max_steps": 1}))


def test_lora_adapter_carries_the_tokenizer_files(family, tmp_path):
    """A LoRA run's adapter directory holds the base's tokenizer.json, tokenizer_config.json (chat template) and a
    generation_config.json whose EOS set has the template's end of turn: it samples and serves on its own."""
    name, base, _ = family
    if name != "qwen2":  # one family is enough: the copy is the same code for all (q/k/v biases, no BOS here)
        pytest.skip("checked on qwen2")
    summary = T.train(T.TrainConfig(model=str(base), out=str(tmp_path), **{**OPTS, "max_steps": 1, "lora_rank": 2}))
    adapter = Path(summary["run_dir"]) / "final"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "tokenizer.model").exists()
    ref = transformers.AutoTokenizer.from_pretrained(adapter)
    assert ref.chat_template == transformers.AutoTokenizer.from_pretrained(base).chat_template
    end, base_eos = (ref.convert_tokens_to_ids(FAMILIES[name][k]) for k in (2, 3))
    assert Tokenizer(adapter).eos_ids == {end, base_eos}
