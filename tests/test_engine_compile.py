"""The static decode step (issue 14 item 4): fixed slot-count buckets, whole-capacity attention under masks, per-row
sampling settings as tensors. Eagerly it gives the eager engine's tokens; compiled by torch.compile (inductor on
the CPU, one bucket and a tiny model to keep compile time small) it gives them too."""
import torch

from fastmath.engine import Engine, SamplingParams
from fastmath.engine.sampling import sample_keys, sample_tokens, sample_tokens_rows, step_keys
from test_engine import model, one_thread, prompts, run, tok  # noqa: F401 (fixtures)


def test_per_row_sampling_equals_sample_tokens():
    torch.manual_seed(0)
    N, V = 64, 300
    logits = torch.randn(N, V) * 3
    keys = step_keys(sample_keys(4, torch.arange(N), torch.arange(N)), torch.full((N,), 2))
    settings = [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 7), (0.0, 1.0, 0), (1.0, 0.5, 20)]
    rows = torch.arange(N) % len(settings)
    greedy = torch.arange(N) % 9 == 0
    want = torch.empty(N, dtype=torch.int64)
    for i, (t, p, k) in enumerate(settings):
        m = rows == i
        want[m] = sample_tokens(logits[m], keys[m], t, p, k, greedy[m])
    temp = torch.tensor([settings[i][0] for i in rows])
    top_p = torch.tensor([settings[i][1] for i in rows])
    top_k = torch.tensor([settings[i][2] for i in rows])
    got = sample_tokens_rows(logits, keys, temp, top_p, top_k, greedy, filtered=True)
    assert torch.equal(got, want)
    plain = rows == 0
    got = sample_tokens_rows(logits[plain], keys[plain], temp[plain], top_p[plain], top_k[plain], greedy[plain], False)
    assert torch.equal(got, want[plain])


def _requests(prompts, filtered):
    kws = [dict(n=5, temperature=1.0, greedy=True), dict(n=3, temperature=0.0), dict(n=4, temperature=0.8, seed=3)]
    if filtered:
        kws += [dict(n=4, temperature=1.1, top_p=0.8, seed=1), dict(n=3, temperature=0.9, top_k=15, logprobs=1)]
    return [(f"r{i}", prompts[i], SamplingParams(max_new_tokens=12, stop_at_answer=False, **kw))
            for i, kw in enumerate(kws)]


def _compare(a, b):
    same = sum(a[k] == b[k] for k in a) / len(a)
    greedy = [k for k in a if k[0] == "r1" or (k[0] == "r0" and k[1] == 5)]
    return same, all(a[k] == b[k] for k in greedy)


def test_static_step_eagerly_gives_the_eager_engines_tokens(model, tok, prompts):  # noqa: F811
    reqs = _requests(prompts, filtered=True)
    eager = run(Engine(model, tok, max_slots=8, max_model_len=128), reqs)
    static = run(Engine(model, tok, max_slots=8, max_model_len=128, static_step=True, buckets=[2, 4, 8]), reqs)
    same, greedy = _compare(eager, static)
    print(f"\nstatic step (eager) vs eager: {100 * same:.1f}% samples identical")
    assert set(static) == set(eager) and same >= 0.99 and greedy


def test_compiled_step_on_cpu_gives_the_eager_engines_tokens(model, tok, prompts):  # noqa: F811
    reqs = _requests(prompts, filtered=False)
    eager = run(Engine(model, tok, max_slots=8, max_model_len=80), reqs)
    torch._dynamo.reset()
    engine = Engine(model, tok, max_slots=8, max_model_len=80, compile=True, buckets=[8])
    compiled = run(engine, reqs)
    same, greedy = _compare(eager, compiled)
    print(f"\ncompiled step (inductor, CPU) vs eager: {100 * same:.1f}% samples identical")
    assert set(compiled) == set(eager) and same >= 0.99 and greedy
    assert engine.counters["decode_steps"] > 5
