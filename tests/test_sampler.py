"""The sampler engine: exact shared-prefix attention, cached decode == full recompute, greedy == Hugging Face,
batch-independent noise, the sampling distribution, stops, continuous batching and the memory plan."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastmath.checkpoint import save_checkpoint
from fastmath.config import get_preset
from fastmath.data import encode_prompt
from fastmath.model import Transformer
from fastmath.sampler import (SAMPLING_BYTES_PER_LOGIT, SamplingParams, Sampler, SharedPrefixKVCache, gumbel_noise,
                              merge_attention, plan_memory, sample_keys, sample_tokens, shared_prefix_decode_attention,
                              step_keys)
from fastmath.synth.procedural import SMALL_CONFIG, generate


@pytest.fixture(scope="module")
def tok(procedural_tok):
    return procedural_tok


@pytest.fixture(scope="module")
def questions():
    return [r["question"] for r in generate(6, SMALL_CONFIG, split="test")]


def make_model(vocab, std=0.2, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Transformer(get_preset("test").replace(vocab_size=vocab))
    model.init_weights(std=std)  # larger than 0.02 so greedy choices have clear margins
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("use_groups", [True, False])
@pytest.mark.parametrize("Hkv,R", [(2, 2), (3, 1)])
def test_shared_prefix_attention_equals_plain_attention_over_copied_prefixes(use_groups, Hkv, R):
    torch.manual_seed(0)
    D, P, Lcap, Scap = 16, 3, 11, 7
    slot_prefix = torch.tensor([0, 2, 0, 1, 2, 0])
    prefix_len = torch.tensor([11, 4, 9])
    suffix_len = torch.tensor([1, 7, 3, 5, 2, 6])
    B = len(slot_prefix)
    q = torch.randn(B, Hkv * R, D)
    pk, pv = torch.randn(P, Hkv, Lcap, D), torch.randn(P, Hkv, Lcap, D)
    sk, sv = torch.randn(B, Hkv, Scap, D), torch.randn(B, Hkv, Scap, D)
    groups = None
    if use_groups:
        groups = [(e, torch.nonzero(slot_prefix == e).flatten(), int(prefix_len[e])) for e in range(P)]
    out = shared_prefix_decode_attention(q, pk, pv, prefix_len, slot_prefix, sk, sv, suffix_len, groups)
    for b in range(B):  # reference: copy the prefix in front of the suffix, plain softmax attention in fp64
        e, lp, ls = int(slot_prefix[b]), int(prefix_len[slot_prefix[b]]), int(suffix_len[b])
        k = torch.cat([pk[e, :, :lp], sk[b, :, :ls]], dim=1).double().repeat_interleave(R, 0)  # (H, L, D)
        v = torch.cat([pv[e, :, :lp], sv[b, :, :ls]], dim=1).double().repeat_interleave(R, 0)
        w = torch.softmax((q[b].double()[:, None, :] @ k.transpose(-1, -2)) / math.sqrt(D), dim=-1)
        ref = (w @ v)[:, 0]
        torch.testing.assert_close(out[b].double(), ref, atol=2e-5, rtol=1e-5)


def test_merge_attention_of_two_halves_is_attention_over_the_union():
    torch.manual_seed(1)
    q, k, v = torch.randn(5, 8).double(), torch.randn(5, 12, 8).double(), torch.randn(5, 12, 8).double()

    def part(sl):
        s = torch.einsum("nd,nld->nl", q, k[:, sl])
        return torch.einsum("nl,nld->nd", torch.softmax(s, -1), v[:, sl]), torch.logsumexp(s, -1)

    o, lse = merge_attention(*part(slice(0, 5)), *part(slice(5, 12)))
    ref_o, ref_lse = part(slice(0, 12))
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(lse, ref_lse)
    # an empty part (lse = -inf) leaves the other unchanged
    o2, _ = merge_attention(ref_o, ref_lse, torch.zeros_like(ref_o), torch.full_like(ref_lse, -math.inf))
    torch.testing.assert_close(o2, ref_o)


def test_cached_decode_logits_equal_full_recompute():
    model = make_model(512, std=0.05)
    a = model.args
    torch.manual_seed(3)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (9, 5)]
    # three sequences: two share prompt 0, one uses prompt 1; each continues with its own tokens
    slot_prompt = [0, 1, 0]
    conts = [torch.randint(3, 512, (6,)).tolist() for _ in slot_prompt]
    cache = SharedPrefixKVCache(a.n_layers, a.n_kv_heads, a.head_dim, 2, 16, 3, 8, torch.float32, "cpu")
    with torch.inference_mode():
        cache.prefill([0, 1], [len(p) for p in prompts])
        toks = torch.tensor(prompts[0] + prompts[1])
        pos = torch.cat([torch.arange(len(p)) for p in prompts])
        last = torch.tensor([len(prompts[0]) - 1, len(prompts[0]) + len(prompts[1]) - 1])
        pre_logits = model(toks, positions=pos, cache=cache, logits_index=last)
        cache.advance()
        slot_prefix = torch.tensor(slot_prompt)
        for step in range(6):
            B = 3 if step < 4 else 2  # the last slot leaves after 4 steps: a smaller batch keeps decoding
            new = torch.tensor([conts[b][step] for b in range(B)])
            cache.decode(B, slot_prefix[:B], step)
            positions = cache.prefix_len[slot_prefix[:B]] + cache.suffix_len[:B]
            logits = model(new, positions=positions, cache=cache)
            cache.advance()
            for b in range(B):
                full = torch.tensor(prompts[slot_prompt[b]] + conts[b][: step + 1])[None]
                ref = model(full)[0, -1]
                torch.testing.assert_close(logits[b], ref, atol=1e-4, rtol=1e-4)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(pre_logits[i], model(torch.tensor(p)[None])[0, -1], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# greedy == Hugging Face generate


def test_greedy_equals_hf_generate(tok, questions, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_model(tok.vocab_size)
    save_checkpoint(model, tmp_path / "ckpt", tokenizer_path=tok.path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="sdpa",
                                                       dtype=torch.float32).eval()
    prompts = [encode_prompt(tok, q, "plain") for q in questions]
    max_new = 24
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=max_new, eos_token_id=tok.eos_id, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    # 3 slots for 6 problems x 2 greedy samples: slots are refilled and shared across problems
    sampler = Sampler(model, tok, max_slots=3)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=max_new, stop_at_answer=False)
    got = {r.index: r for r in sampler.run(prompts, params)}
    for i, exp in enumerate(expected):
        for c in got[i].samples:
            assert c.tokens == exp, f"problem {i}"
    assert any(len(set(e)) > 3 for e in expected), "the test needs non-trivial continuations"


# ----------------------------------------------------------------------------------------------------------
# reproducible noise


class TableModel(torch.nn.Module):
    """Logits a fixed function of (token, position) per row: independent of batch composition."""

    def __init__(self, vocab, seed=0):
        super().__init__()
        self.args = get_preset("test").replace(vocab_size=vocab)
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)
        self.pos = torch.nn.Parameter(torch.randn(512, vocab, generator=g))

    def forward(self, tokens, positions=None, cache=None, logits_index=None, **_):
        if logits_index is not None:
            tokens, positions = tokens[logits_index], positions[logits_index]
        return self.table[tokens] + self.pos[positions]


def test_samples_do_not_depend_on_slot_count(tok, questions):
    model = TableModel(tok.vocab_size)
    prompts = [encode_prompt(tok, q, "plain") for q in questions]
    params = SamplingParams(n=7, temperature=1.0, top_p=0.95, max_new_tokens=20, greedy=True, stop_at_answer=False)
    runs = []
    for slots in (1, 4, 64):
        s = Sampler(model, tok, max_slots=slots)
        runs.append({r.index: [c.tokens for c in r.samples] + [r.greedy.tokens] for r in s.run(prompts, params)})
        assert s.plan.n_slots == min(slots, len(prompts) * params.per_prompt)
    assert runs[0] == runs[1] == runs[2]
    # sharded runs (another order, other problems in flight) draw the same samples by global index
    s = Sampler(model, tok, max_slots=5)
    shard = {r.index: [c.tokens for c in r.samples] + [r.greedy.tokens]
             for r in s.run(prompts[1::2], params, indices=range(1, len(prompts), 2))}
    assert all(shard[i] == runs[0][i] for i in shard)
    # the noise really varies: samples of a problem differ, another seed gives other samples
    assert all(len({tuple(t) for t in v[:-1]}) > 1 for v in runs[0].values())
    other = Sampler(model, tok, max_slots=4).run(prompts, SamplingParams(**{**params.__dict__, "seed": 1}))
    assert {r.index: [c.tokens for c in r.samples] + [r.greedy.tokens] for r in other} != runs[0]


def test_noise_is_a_function_of_key_and_token_only():
    keys = step_keys(sample_keys(0, torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0])), torch.tensor([3, 3, 3]))
    full = gumbel_noise(keys, torch.arange(100))
    part = gumbel_noise(keys[1:2], torch.tensor([[7, 42, 99]]))
    torch.testing.assert_close(part[0], full[1, [7, 42, 99]], rtol=0, atol=0)
    assert len(set(keys.tolist())) == 3


@pytest.mark.parametrize("case", ["peaked", "flat", "masked", "ties", "one_hot"])
def test_pruned_gumbel_argmax_equals_full_vocabulary_draw(case):
    """gumbel_argmax hashes noise only for tokens that can win: the same token as argmax(z + noise) over
    the whole vocabulary, row by row, including ties (lowest id) and -inf-masked tokens."""
    from fastmath.engine.sampling import gumbel_argmax

    g = torch.Generator().manual_seed(1)
    N, V = 512, 768
    z = torch.randn(N, V, generator=g)
    if case == "peaked":  # a trained model at T=0.7: one or a few tokens far ahead
        z = z * 2 + torch.zeros(N, V).scatter_(1, torch.randint(V, (N, 3), generator=g), 12.0)
    elif case == "flat":  # an untrained model: most of the vocabulary could win (whole-vocabulary fallback)
        z = z * 0.1
    elif case == "masked":  # top-p leaves a few tokens; the rest are -inf
        z = (z * 3).masked_fill(torch.rand(N, V, generator=g) < 0.97, float("-inf"))
        z[torch.arange(N), z.argmax(-1)] = 5.0
    elif case == "ties":  # many exactly equal leaders: the lowest id must win when scores tie
        z = torch.full((N, V), -30.0)
        z[:, 100:110] = 3.0
        z[:, 5] = 3.0
    else:
        z = torch.full((N, V), -1e4)
        z[torch.arange(N), torch.randint(V, (N,), generator=g)] = 0.0
    keys = step_keys(sample_keys(3, torch.arange(N) % 7, torch.arange(N)), torch.arange(N) % 5)
    full = (z + gumbel_noise(keys, torch.arange(V))).argmax(-1)
    assert torch.equal(gumbel_argmax(z, keys), full)
    # and through sample_tokens (temperature scaling, nucleus mask)
    logits = z.masked_fill(torch.isinf(z), -1e9)
    for t, p in ((0.7, 1.0), (1.0, 0.9)):
        zz = logits / t
        if p < 1.0:
            from fastmath.engine.sampling import _nucleus_mask
            zz = _nucleus_mask(zz, p)
        want = (zz + gumbel_noise(keys, torch.arange(V))).argmax(-1)
        assert torch.equal(sample_tokens(logits, keys, t, p, 0), want)


def test_gumbel_noise_is_finite_at_the_largest_hash():
    """A hash whose top 24 bits are all ones gave u = 1.0 in fp32 and +inf noise (a token drawn whatever its
    logit, even a masked one): the noise stays finite and below GUMBEL_MAX."""
    from fastmath.engine.sampling import GUMBEL_MAX, _M32, _mix32

    x = None
    for start in range(0, 1 << 28, 1 << 22):  # mix32 is a bijection: 256 of the 2^32 inputs hash there
        xs = torch.arange(start, start + (1 << 22), dtype=torch.long)
        hit = torch.nonzero((_mix32(xs) >> 8) == (1 << 24) - 1)
        if len(hit):
            x = int(xs[hit[0, 0]])
            break
    assert x is not None
    tok0 = int(_mix32(torch.tensor([0x7F4A7C15]))[0])  # token 0's hash, as gumbel_noise mixes it
    key = torch.tensor([(x - tok0) & _M32])
    g = gumbel_noise(key, torch.tensor([0, 1, 2]))
    assert torch.isfinite(g).all() and g[0, 0] <= GUMBEL_MAX and g[0, 0] > 16
    assert int(sample_tokens(torch.tensor([[-1e9, 0.0, 5.0]]), key, 1.0, 0.5, 0)[0]) == 2  # token 0 is masked


def test_pruned_gumbel_argmax_exact_with_fp32_ties_of_the_sum():
    """Scores that tie only after fp32 rounding of z + noise, the higher-logit token having the higher id: the
    whole-vocabulary argmax takes the lower id, and so must the pruned draw (which sees the higher logit first)."""
    from fastmath.engine.sampling import gumbel_argmax

    N, V = 64, 1024  # a noise value above 4.5 in every row (P ~ 1e-5 of none)
    keys = step_keys(sample_keys(0, torch.zeros(N, dtype=torch.long), torch.arange(N)), torch.zeros(N, dtype=torch.long))
    noise = gumbel_noise(keys, torch.arange(V))
    big = float(2 ** 27)  # fp32 spacing 8 below, 16 above: (big - 8) + g rounds to big for g > 4, big + g for g < 8
    z = torch.full((N, V), -1e3)
    lo = [int(torch.nonzero(noise[r, :-1] > 4.5)[0]) for r in range(N)]
    hi = [lo[r] + 1 + int(torch.nonzero(noise[r, lo[r] + 1:] < 7.5)[0]) for r in range(N)]
    rows = torch.arange(N)
    z[rows, lo] = big - 8
    z[rows, hi] = big
    score = z + noise
    assert torch.equal(score[rows, lo], score[rows, hi])  # the constructed ties
    assert torch.equal((z + noise).argmax(-1), torch.tensor(lo))
    assert torch.equal(gumbel_argmax(z, keys), torch.tensor(lo))


def _brute_force_probs(z, top_p, top_k):
    """Allowed set and renormalised probabilities by enumeration (fp64)."""
    z = z.double()
    order = sorted(range(len(z)), key=lambda i: -float(z[i]))
    if top_k:
        order = order[:top_k]
    p = torch.softmax(z[order], 0)
    keep, mass = [], 0.0
    for i, pi in zip(order, p.tolist()):
        if mass >= top_p:
            break
        keep.append(i)
        mass += pi
    probs = torch.zeros(len(z), dtype=torch.float64)
    probs[keep] = torch.softmax(z[keep], 0)
    return probs


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.8, 0), (1.3, 1.0, 4), (1.0, 0.6, 5)])
def test_sampling_distribution_matches_softmax_with_filters(temperature, top_p, top_k):
    torch.manual_seed(0)
    V, N = 12, 40000
    logits = torch.randn(V) * 1.5
    keys = step_keys(sample_keys(0, torch.zeros(N, dtype=torch.long), torch.arange(N)), torch.zeros(N, dtype=torch.long))
    draws = sample_tokens(logits.expand(N, V).clone(), keys, temperature, top_p, top_k)
    freq = torch.bincount(draws, minlength=V).double() / N
    ref = _brute_force_probs(logits / temperature, top_p, top_k)
    assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(ref).flatten().tolist())
    # 5 standard errors of a binomial proportion
    assert torch.all((freq - ref).abs() <= 5 * torch.sqrt(ref * (1 - ref) / N) + 1e-3), (freq, ref)


# ----------------------------------------------------------------------------------------------------------
# stops, continuous batching, memory


class ScriptModel(torch.nn.Module):
    """Emits a fixed token script after a prompt of known length (one-hot logits by position)."""

    def __init__(self, vocab, script, prompt_len):
        super().__init__()
        self.args = get_preset("test").replace(vocab_size=vocab)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab

    def forward(self, tokens, positions=None, cache=None, logits_index=None, **_):
        if logits_index is not None:
            positions = positions[logits_index]
        step = (positions - (self.prompt_len - 1)).clamp(0, len(self.script) - 1)
        return F.one_hot(torch.tensor(self.script)[step], self.vocab).float() * 30


@pytest.mark.parametrize("tail,reason", [("\nThe answer is: 42\nmore text", "answer"), (" no stop here", "eos"),
                                         ("", "length")])
def test_stops(tok, tail, reason):
    body = tok.encode("Mia has 3 apples." + tail, bos=False)
    script = body + ([tok.eos_id] if reason == "eos" else []) + tok.encode(" filler" * 30, bos=False)
    prompt = tok.encode("Question: x", bos=True)
    model = ScriptModel(tok.vocab_size, script, len(prompt))
    max_new = 40
    (res,) = Sampler(model, tok).run([prompt], SamplingParams(n=3, temperature=1.0, max_new_tokens=max_new))
    for c in res.samples:
        assert c.finish_reason == reason
        if reason == "answer":
            assert c.text == "Mia has 3 apples.\nThe answer is: 42"
            n = len(tok.encode("Mia has 3 apples.\nThe answer is: 42\n", bos=False))
            assert len(c.tokens) in (n, n + 1) and c.tokens == script[: len(c.tokens)]
            assert "\n" in tok.decode(c.tokens[-1:]) or tok.id_to_piece(c.tokens[-1]) == "<0x0A>"
        elif reason == "eos":
            assert c.tokens == body + [tok.eos_id] and c.text == tok.decode(body)
        else:
            assert len(c.tokens) == max_new
    # an explicit stop string cuts the text before it
    (res,) = Sampler(model, tok).run([prompt], SamplingParams(n=1, max_new_tokens=max_new, stop_at_answer=False,
                                                              stop_strings=("apples",)))
    assert res.samples[0].finish_reason == "stop" and res.samples[0].text == "Mia has 3 "


def test_continuous_batching_decodes_no_padding_and_prefills_each_prompt_once(tok, questions):
    model = TableModel(tok.vocab_size, seed=1)
    prompts = [encode_prompt(tok, q, "plain") for q in questions]
    eos_heavy = SamplingParams(n=9, temperature=1.5, max_new_tokens=30, stop_at_answer=False)
    model.table.data[:, tok.eos_id] += 1.0  # EOS is likely: lengths vary a lot
    s = Sampler(model, tok, max_slots=8)
    res = list(s.run(prompts, eos_heavy))
    lengths = [len(c.tokens) for r in res for c in r.samples]
    assert len(set(lengths)) > 5 and len(res) == len(prompts)
    # every decoded row produced a token of a live sample: the first token of each sample comes from its
    # prompt's prefill logits, every further token from exactly one decode row
    assert s.stats["slot_steps"] == sum(lengths) - len(lengths)
    assert s.stats["prefill_tokens"] == sum(len(p) for p in prompts)
    # the batch was kept full while work was pending: steps ~ total rows / slots
    assert s.stats["decode_steps"] <= math.ceil(s.stats["slot_steps"] / 8) + max(lengths)


def test_memory_plan_adapts_and_rejects_prompts_that_cannot_fit(tok):
    args = get_preset("test")
    bpt = SharedPrefixKVCache.bytes_per_token(args.n_layers, args.n_kv_heads, args.head_dim, torch.float32)
    extra = SAMPLING_BYTES_PER_LOGIT * args.vocab_size  # per-slot sampling buffers
    for budget_tokens in (3000, 30000):
        budget = budget_tokens * bpt
        plan = plan_memory(args, torch.float32, budget, 100, 200, 257, 50, 10**6)
        assert plan.cache_bytes + plan.n_slots * extra <= budget
        assert (plan.n_slots + 1) * (200 * bpt + extra) + plan.n_prefixes * 100 * bpt > budget  # no room for one more
    assert plan_memory(args, torch.float32, 3000 * bpt, 100, 200, 257, 50, 10**6).n_slots < plan.n_slots
    model = make_model(tok.vocab_size)
    prompts = [tok.encode("short"), tok.encode("a much longer prompt " * 20)]
    with pytest.raises(ValueError, match=r"problem 1: a prompt of \d+ tokens plus 64 new tokens needs"):
        next(Sampler(model, tok, kv_cache_gb=100 * bpt / 2**30).run(prompts, SamplingParams(n=2, max_new_tokens=64)))
