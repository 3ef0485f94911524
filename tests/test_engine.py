"""The request-stream engine (issue 14 items 1-2): batch invariance of a request's samples on a real tiny fp32
Transformer (alone, beside other requests, at another slot count, arriving later), log-probs against an fp64
recompute, per-request stops, refusal of requests that can never fit, waiting, abort, and the host-only
scheduler."""

import pytest
import torch

from fastmath.config import get_preset
from fastmath.data import encode_prompt
from fastmath.engine import Engine, EngineError, SamplingParams
from fastmath.engine.scheduler import Scheduler
from fastmath.model import Transformer
from fastmath.synth.procedural import SMALL_CONFIG, generate
from test_sampler import ScriptModel


@pytest.fixture(autouse=True)
def one_thread():
    """The test models are tiny: one thread is faster, and on 2 shared cores two threads of OpenMP can wait on
    each other for ~10 ms per op (a 40x slower test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(procedural_tok):
    return procedural_tok


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = Transformer(get_preset("test").replace(vocab_size=tok.vocab_size))
    m.init_weights(std=0.2)
    return m.float().eval()


@pytest.fixture(scope="module")
def prompts(tok):
    return [encode_prompt(tok, r["question"], "plain") for r in generate(5, SMALL_CONFIG, split="test")]


# the requests of the invariance test: each with its own settings
SETTINGS = [dict(n=6, temperature=1.0, greedy=True), dict(n=5, temperature=0.7, top_p=0.9, seed=11),
            dict(n=4, temperature=1.2, top_k=20, seed=5, stop_strings=("=",)), dict(n=1, temperature=0.0),
            dict(n=7, temperature=0.9, top_p=0.8, top_k=50, seed=2, logprobs=2)]


def run(engine: Engine, requests, late=(), late_after=3):
    """Drive the engine to the end; `late` requests are added after `late_after` steps.
    Returns {(request id, sample index): token ids} and checks that the streamed pieces add up."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    got, streamed, steps = {}, {}, 0
    while engine.has_unfinished() or (late and steps <= late_after):
        if steps == late_after:
            for rid, prompt, params in late:
                engine.add_request(rid, prompt, params)
        for out in engine.step():
            for s in out.outputs:
                streamed.setdefault((out.request_id, s.index), []).extend(s.new_token_ids)
                assert s.token_ids == streamed[(out.request_id, s.index)]
                if s.finished:
                    got[(out.request_id, s.index)] = s.token_ids
        steps += 1
    return got


def requests_of(prompts, max_new=20):
    return [(f"r{i}", prompts[i], SamplingParams(max_new_tokens=max_new, stop_at_answer=False, **kw))
            for i, kw in enumerate(SETTINGS)]


def test_samples_do_not_depend_on_what_runs_beside_them(model, tok, prompts):
    reqs = requests_of(prompts)
    alone = {}
    for r in reqs:
        alone.update(run(Engine(model, tok, max_slots=8, max_model_len=256), [r]))
    together = run(Engine(model, tok, max_slots=64, max_model_len=256), reqs)
    few_slots = run(Engine(model, tok, max_slots=3, max_model_len=256), reqs)
    staggered = run(Engine(model, tok, max_slots=10, max_model_len=256), reqs[::2], late=reqs[1::2])
    n = sum(r[2].per_prompt for r in reqs)
    for other in (together, few_slots, staggered):
        assert set(other) == set(alone) and len(alone) == n
    same = [alone[k] == other[k] for other in (together, few_slots, staggered) for k in alone]
    frac = sum(same) / len(same)
    print(f"\nbatch invariance: {sum(same)}/{len(same)} samples identical ({100 * frac:.1f}%)")
    assert frac >= 0.99
    greedy = [k for k in alone if k[0] == "r3" or (k[0] == "r0" and k[1] == 6)]
    assert all(alone[k] == other[k] for other in (together, few_slots, staggered) for k in greedy)
    # the noise really varies: samples differ within a request, and another seed draws other samples
    assert len({tuple(alone[("r0", j)]) for j in range(6)}) > 1
    p = SamplingParams(**{**reqs[0][2].__dict__, "seed": 1})
    assert run(Engine(model, tok, max_slots=8, max_model_len=256), [("r0", prompts[0], p)]) != \
        {k: v for k, v in alone.items() if k[0] == "r0"}


def test_noise_key_is_the_prompt_hash_or_given_and_seed_none_is_random(model, tok, prompts):
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, stop_at_answer=False)
    e = Engine(model, tok, max_slots=16, max_model_len=256)
    a = run(e, [("a", prompts[0], p), ("b", prompts[0], p)])  # same prompt and seed: the same samples
    assert all(a[("a", j)] == a[("b", j)] for j in range(4))
    b = run(e, [("c", prompts[0], p)])
    e.add_request("d", prompts[0], p, noise_key=12345)
    c = run(e, [])
    assert [b[("c", j)] for j in range(4)] == [a[("a", j)] for j in range(4)]
    assert [c[("d", j)] for j in range(4)] != [a[("a", j)] for j in range(4)]
    r = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, stop_at_answer=False, seed=None)
    d = run(e, [("e", prompts[0], r), ("f", prompts[0], r)])
    assert [d[("e", j)] for j in range(4)] != [d[("f", j)] for j in range(4)]


def _ref_logprobs(model, ids):
    """fp64 log-softmax of the full recompute: row t predicts ids[t + 1]."""
    m = Transformer(model.args)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        return torch.log_softmax(m.double()(torch.tensor(ids)[None])[0], -1)


def test_logprobs_and_prompt_logprobs_equal_an_fp64_recompute(model, tok, prompts):
    e = Engine(model, tok, max_slots=4, max_model_len=256)
    params = SamplingParams(n=2, temperature=1.3, top_p=0.7, max_new_tokens=8, stop_at_answer=False, logprobs=3,
                            prompt_logprobs=2)
    e.add_request("x", prompts[1], params)
    e.add_request("y", prompts[2], SamplingParams(n=3, max_new_tokens=5, stop_at_answer=False))  # none asked
    outs = []
    while e.has_unfinished():
        outs += e.step()
    first = next(o for o in outs if o.request_id == "x")
    assert all(o.prompt_logprobs is None for o in outs if o is not first or o.request_id == "y")
    plp = first.prompt_logprobs
    P = prompts[1]
    assert len(plp) == len(P) and plp[0] is None
    final = {s.index: s for o in outs if o.request_id == "x" for s in o.outputs if s.finished}
    V = tok.vocab_size
    for j, s in final.items():
        ref = _ref_logprobs(model, P + s.token_ids)[:, :V]
        assert len(s.logprobs) == len(s.token_ids)
        for t, (tok_id, d) in enumerate(zip(s.token_ids, s.logprobs)):
            row = ref[len(P) - 1 + t]
            top = row.topk(3)
            assert set(d) == {tok_id} | set(top.indices.tolist())
            for k, v in d.items():  # raw distribution: neither temperature nor top-p applied
                assert abs(v - float(row[k])) < 1e-4
    ref = _ref_logprobs(model, P)[:, :V]
    for t in range(1, len(P)):
        d = plp[t]
        assert set(d) == {P[t]} | set(ref[t - 1].topk(2).indices.tolist())
        assert all(abs(v - float(ref[t - 1][k])) < 1e-4 for k, v in d.items())


def test_per_request_stops(tok):
    body = tok.encode("Mia has 3 apples.\nThe answer is: 42\nmore", bos=False)
    script = body + [tok.eos_id] + tok.encode(" filler" * 30, bos=False)
    prompt = tok.encode("Question: x", bos=True)
    model = ScriptModel(tok.vocab_size, script, len(prompt))
    e = Engine(model, tok, max_slots=8, max_model_len=200)
    stop_id = body[3]
    reqs = {"answer": SamplingParams(n=1, max_new_tokens=40),
            "eos": SamplingParams(n=1, max_new_tokens=40, stop_at_answer=False),
            "string": SamplingParams(n=1, max_new_tokens=40, stop_at_answer=False, stop_strings=("apples",)),
            "token": SamplingParams(n=2, max_new_tokens=40, stop_at_answer=False, stop_token_ids=(stop_id,)),
            "ignore": SamplingParams(n=1, max_new_tokens=len(body) + 4, stop_at_answer=False, ignore_eos=True),
            "length": SamplingParams(n=1, max_new_tokens=3, stop_at_answer=False)}
    for rid, p in reqs.items():
        e.add_request(rid, prompt, p)
    done = {}
    while e.has_unfinished():
        for o in e.step():
            for s in o.outputs:
                if s.finished:
                    done[o.request_id] = s
    a = done["answer"]
    assert (a.finish_reason, a.stop_reason, a.text) == ("stop", "answer", "Mia has 3 apples.\nThe answer is: 42")
    assert (done["eos"].finish_reason, done["eos"].stop_reason) == ("stop", "eos")
    assert done["eos"].token_ids == body + [tok.eos_id] and done["eos"].text == tok.decode(body)
    s = done["string"]
    assert (s.finish_reason, s.stop_reason, s.text) == ("stop", "apples", "Mia has 3 ")
    t = done["token"]
    assert (t.finish_reason, t.stop_reason, t.token_ids) == ("stop", stop_id, body[:4])
    assert t.text == tok.decode(body[:3])
    i = done["ignore"]
    assert (i.finish_reason, i.token_ids) == ("length", script[: len(body) + 4])
    assert (done["length"].finish_reason, done["length"].stop_reason, len(done["length"].token_ids)) == ("length", None, 3)


def test_refusals_name_the_parameter(model, tok, prompts):
    e = Engine(model, tok, max_slots=4, max_model_len=64, max_prompt_len=40, max_new_tokens=30)
    with pytest.raises(EngineError, match="max_model_len"):
        e.add_request("a", prompts[0][:30], SamplingParams(max_new_tokens=40))
    with pytest.raises(EngineError, match="prompt of 50 tokens is longer"):
        e.add_request("a", list(range(1, 51)), SamplingParams(max_new_tokens=5))
    with pytest.raises(EngineError, match="max_tokens=31"):
        e.add_request("a", [1, 2], SamplingParams(max_new_tokens=31))
    with pytest.raises(EngineError, match="empty"):
        e.add_request("a", [], SamplingParams())
    with pytest.raises(EngineError, match="vocabulary"):
        e.add_request("a", [1, 10**6], SamplingParams())
    e.add_request("a", [1, 2], SamplingParams(n=1, max_new_tokens=2))
    with pytest.raises(EngineError, match="already running"):
        e.add_request("a", [1, 2], SamplingParams())
    for bad, field in ((dict(top_p=0), "top_p"), (dict(temperature=-1), "temperature"), (dict(n=0), "n"),
                       (dict(logprobs=-1), "logprobs"), (dict(stop_token_ids=(-3,)), "stop_token_ids"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(seed="x"), "seed")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    # a KV budget that cannot hold even one slot is refused when the engine is made
    with pytest.raises(ValueError, match="KV cache"):
        Engine(model, tok, kv_cache_gb=1e-6, max_model_len=512)


def test_requests_wait_for_room_and_abort_frees_slots(model, tok, prompts):
    e = Engine(model, tok, max_slots=4, max_model_len=128, n_prompts=2, per_prompt=4)
    assert e.plan.n_slots == 4 and e.plan.n_prefixes == 2
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, stop_at_answer=False)
    for i in range(4):
        e.add_request(f"q{i}", prompts[i], p)
    e.step()
    st = e.stats()
    assert st["slots_in_use"] == 4 and st["running"] + st["waiting"] == 4 and st["waiting"] >= 2
    e.abort("q0")
    assert e.stats()["slots_in_use"] < 4 and e.stats()["running"] + e.stats()["waiting"] == 3
    e.abort("nope")  # unknown id: no-op
    got = run(e, [])
    assert {k[0] for k in got} == {"q1", "q2", "q3"} and not e.has_unfinished()
    assert e.stats()["slots_in_use"] == 0
    # the others drew what they draw alone
    alone = run(Engine(model, tok, max_slots=4, max_model_len=128), [("q2", prompts[2], p)])
    assert all(got[k] == v for k, v in alone.items())


def test_scheduler_keeps_live_slots_dense_and_admits_first_come_first_served():
    class R:
        def __init__(self, name, n, L=3):
            self.name, self.prompt, self.per_prompt = name, [1] * L, n

    s = Scheduler(n_slots=5, n_prefixes=2, prefill_tokens=8)
    a, b, c = R("a", 3), R("b", 4), R("c", 2, L=7)
    for r in (a, b, c):
        s.add(r)
    batch = s.next_prefill(5)  # a (3 samples) is not enough for 5 slots: b too; c waits (no entry left)
    assert batch == [a, b] and list(s.waiting) == [c] and (a.entry, b.entry) == (0, 1)
    s.opened(batch)
    take = s.take(5)
    assert [(r.name, j) for r, j in take] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    slots = s.place(take, [])
    assert slots.tolist() == [0, 1, 2, 3, 4] and s.B == 5
    assert not s.finish(1) and not s.finish(3)  # a0 ... a1 and b0 end
    holes = [3, 1]
    slots = s.place(s.take(2), holes)  # b's last two samples fill the lowest holes
    assert slots.tolist() == [1, 3] and s.slot_sample[[1, 3]].tolist() == [2, 3]
    assert not s.finish(0)
    assert s.finish(2) and a not in s.open  # a's last sample ended: its pool entry is free again
    assert s.next_prefill(3) == [c] and c.entry == 0 and not s.waiting
    src, dst = s.compact([0, 2])  # the last live slots (3, 4) move into the holes
    assert s.B == 3 and dst.tolist() == [0, 2] and src.tolist() == [3, 4]
    assert [s.slot_sample[i] for i in range(3)] == [3, 2, 1] and all(x is None for x in s.slot_req[3:])
    assert all(s.slot_req[i] is b for i in range(3))
    assert sorted(s.remove(b)) == [0, 1, 2] and b not in s.open and s.free_entries == [1]


def test_sliding_window_caps_the_context(tok, prompts, tmp_path):
    """A sliding-window model (Mistral v0.1's 4096; 16 here) runs only up to its window: the default context is
    the window, a larger max_model_len or request is refused by name, and within the window greedy decoding is
    transformers' MistralForCausalLM with that window."""
    from engine_fixture import greedy_reference

    from fastmath.checkpoint import save_checkpoint
    from fastmath.engine.batch import Sampler

    W = 16
    torch.manual_seed(0)
    m = Transformer(get_preset("test").replace(vocab_size=tok.vocab_size, sliding_window=W, model_type="mistral"))
    m.init_weights(std=0.2)
    m = m.float().eval()
    assert m.args.max_seq_len > W
    e = Engine(m, tok, max_slots=2)
    assert e.max_model_len == W
    with pytest.raises(EngineError, match=f"max_model_len {W + 1} is more than the model's sliding_window of {W}"):
        Engine(m, tok, max_slots=2, max_model_len=W + 1)
    prompt = prompts[0][:6]
    with pytest.raises(EngineError, match="more than the model's context of 16 .max_model_len. .the model's sliding_window"):
        e.add_request("long", prompt, SamplingParams(max_new_tokens=W - 5))
    with pytest.raises(ValueError, match="problem 0: a prompt of 6 tokens plus max_new_tokens=11 is more than the "
                                         "model's sliding_window of 16"):
        list(Sampler(m, tok, max_slots=2).run([prompt], SamplingParams(n=1, max_new_tokens=W - 5)))

    e.add_request("ok", prompt, SamplingParams(n=1, temperature=0.0, max_new_tokens=W - 6, stop_at_answer=False,
                                               stop_token_ids=(), ignore_eos=True))
    got = run(e, [])[("ok", 0)]
    assert got == greedy_reference(m, prompt, W - 6)
    transformers = pytest.importorskip("transformers")
    save_checkpoint(m, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == W
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=W - 6, do_sample=False, pad_token_id=0)[0, 6:]
    assert got == ref.tolist()
