"""Training data for a synthesis teacher: `fastmath synth`'s two calls, answered from the procedural generator.

A teacher is a fastmath model that `fastmath serve` serves to the unchanged `fastmath synth` pipeline. It
is trained on the pipeline's own prompts (`fastmath.synth.prompts`, GSM8K variant) with replies in the
formats `fastmath.synth.parse` reads:

* question call (rewriting): the prompt holds one seed question; the reply creates a NEW procedural
  question (a freshly drawn skeleton of the same difficulty, with its own person and item), verifies it
  with its step-by-step solution, and restates it:

      CREATED QUESTION: <new question>
      VERIFICATION AND MODIFICATION: <its solution, ending 'The answer is: N'>
      FINAL CREATED QUESTION: <new question>

* answer call (solving): the prompt holds a question; the reply is the generator's solution with the
  two closing lines the prompt asks for:

      <solution lines>
      FINAL ANSWER: N
      The answer is: N

The prompts are rendered the way `fastmath serve` renders a chat request with one user message for a
checkpoint trained with `template`: `fastmath.data.render_prompt(message, template)` (see
`fastmath.serve.text.render_chat`). Answer-call examples are fastmath problem records (prompt masked, the
reply is the target, exactly as SFT); question-call replies do not end with 'The answer is:', which the
fastmath record format would append, so they are plain-text records holding the rendered prompt, one
space and the reply: with the dummy-prefix SentencePiece tokenizers fastmath trains, that is token for
token the prompt and reply encoded apart (the tests check it), only with the prompt tokens trained too.
"""
from __future__ import annotations

import random

from . import procedural as P
from .prompts import answer_messages, question_messages

STYLE = "gsm8k"  # procedural answers are single numbers: the pipeline's GSM8K variant (its `auto` choice)


def question_reply(question: str, solution: str) -> str:
    """The question call's reply for a created `question` verified by its `solution`."""
    return (f"CREATED QUESTION: {question}\nVERIFICATION AND MODIFICATION: {solution.strip()}\n"
            f"FINAL CREATED QUESTION: {question}")


def answer_reply(solution: str, answer: str) -> str:
    """The answer call's reply: the solution's steps, then 'FINAL ANSWER: N' and 'The answer is: N'."""
    lines = solution.strip().split("\n")
    if lines[-1].startswith("The answer is:"):
        lines = lines[:-1]
    return "\n".join(lines + [f"FINAL ANSWER: {answer}", f"The answer is: {answer}"])


def question_prompt(seed_question: str) -> str:
    """The user message of the question call (the text the pipeline sends)."""
    return question_messages(seed_question, STYLE)[0]["content"]


def answer_prompt(question: str) -> str:
    """The user message of the answer call."""
    return answer_messages(question, STYLE)[0]["content"]


def question_record(seed_question: str, new: dict, template: str) -> dict:
    """A plain-text training record: the rendered question-call prompt, a space, the reply for problem `new`."""
    from ..data import render_prompt

    return {"text": render_prompt(question_prompt(seed_question), template) + " "
            + question_reply(new["question"], new["solution"])}


def answer_record(problem: dict) -> dict:
    """A fastmath problem record whose question is the answer-call prompt and whose solution is the reply."""
    return {"question": answer_prompt(problem["question"]),
            "solution": answer_reply(problem["solution"], problem["answer"]), "answer": str(problem["answer"])}


def teacher_records(cfg: P.ProceduralConfig, n_question: int, n_answer: int, n_plain: int = 0, seed: int = 0,
                    template: str = "plain") -> list[dict]:
    """A shuffled training set for a teacher, from train-split problems only (streams apart from `seed`'s
    pre-training and SFT streams: seeds 1000+seed...).

    n_question: question-call examples (a seed question, then a new problem drawn independently of it).
    n_answer: answer-call examples.
    n_plain: plain `question + solution` texts (the generator's pre-training form), for arithmetic practice.
    """
    base = 1000 + 10 * seed
    seeds = P.generate(n_question, cfg, "train", seed=base)
    new = P.generate(n_question, cfg, "train", seed=base + 1)
    recs = [question_record(s["question"], p, template) for s, p in zip(seeds, new)]
    recs += [answer_record(p) for p in P.generate(n_answer, cfg, "train", seed=base + 2)]
    recs += [{"text": r["text"]} for r in P.generate(n_plain, cfg, "train", seed=base + 3, plain=True)]
    random.Random(base).shuffle(recs)
    return recs


def tokenizer_sentences(records: list[dict], template: str = "plain") -> list[str]:
    """The texts a teacher tokenizer is trained on: every rendered prompt and every reply as separate texts, so
    that no piece spans the prompt/reply boundary (a question record then tokenizes as prompt + reply)."""
    from ..data import render_prompt

    cue = render_prompt("\x00", template).split("\x00", 1)[1]  # the template's text after the question
    out = []
    for r in records:
        if "question" in r:
            out += [render_prompt(r["question"], template), r["solution"]]
        elif cue and cue + " " in r["text"] and "FINAL CREATED QUESTION" in r["text"]:
            prompt, _, reply = r["text"].partition(cue + " ")
            out += [prompt + cue, reply]
        else:
            out.append(r["text"])
    return out


def prompt_heads(template: str = "plain") -> list[str]:
    """The fixed text of each rendered call prompt before its question (the question-call head ends with
    "Seed problem:\n", the answer-call head with "Problem:\n"): everything the pipeline sends that is not the
    seed or created question itself, apart from the template's answer cue after it."""
    from ..data import render_prompt

    return [render_prompt(question_prompt("\x00"), template).split("\x00", 1)[0],
            render_prompt(answer_prompt("\x00"), template).split("\x00", 1)[0]]


def train_teacher_tokenizer(records: list[dict], path, vocab_size: int = 2048, template: str = "plain",
                            words: bool = True, heads: bool = True):
    """A SentencePiece BPE model for a teacher.

    words=True (the default): pieces never span a space, so a question's person and item are the same token
    wherever they occur (`vocab_size` is then an upper bound: the model stops when no pair is left to merge,
    ~1,500 pieces on repro_table1's records). words=False: pieces may span words (up to 128 characters); the
    long fixed prompts compress about 2.5x, but people and items fuse with the text around them into phrase
    pieces ("\u2581How\u2581many\u2581apples\u2581does\u2581Ines\u2581have\u2581now"), and a teacher trained
    so mixed people and items up in every question it wrote (repro_table1's run of 2026-12-03). Otherwise
    fastmath's conventions (`fastmath.tokenizer.train_tokenizer`): digits split, byte fallback, identity
    normalisation, dummy prefix, <unk>=0 <s>=1 </s>=2. The template's answer cue (for `plain`, "\\nAnswer:")
    is one fixed piece, so a prompt always ends on a piece boundary.

    heads=True (the default): each call's fixed prompt text before its question (`prompt_heads`, ~200 and ~80
    words) is one piece too, so a prompt costs its question's tokens plus two: the teacher's training and the
    server's prefill spend nothing on the long instructions (GPT-4 reads them; a 1M-parameter teacher only needs
    to know which call it is answering).
    """
    import os
    import tempfile
    from pathlib import Path

    import sentencepiece as spm

    from ..data import render_prompt
    from ..fsio import atomic_write
    from ..tokenizer import Tokenizer

    cue = render_prompt("\x00", template).split("\x00", 1)[1]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(tokenizer_sentences(records, template)), model_prefix=prefix,
            vocab_size=vocab_size, model_type="bpe", split_digits=True, byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, max_sentence_length=1 << 16, split_by_whitespace=words,
            max_sentencepiece_length=16 if words else 128, hard_vocab_limit=not words,
            user_defined_symbols=([cue] if cue.strip() else [])
            + ([h.replace(" ", "\u2581") for h in prompt_heads(template)] if heads else []),
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
        data = Path(prefix + ".model").read_bytes()
    atomic_write(Path(path), data)
    return Tokenizer(path)
