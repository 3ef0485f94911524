"""Text normalisation, near-duplicate search and decontamination by word n-grams. Python + numpy (no torch).

- `NearDupIndex`: exact match of normalised text, and near duplicates by the Jaccard similarity of word
  n-gram sets (default 3-grams, threshold 0.7). Prefix filtering (Bayardo et al., "Scaling up all pairs
  similarity search", 2007) keeps it sub-quadratic: with one global order of n-grams, two sets with
  Jaccard >= t must share a gram within the first |A| - ceil(t|A|) + 1 grams of each, so only those
  prefixes are put in the inverted index; candidates are then checked exactly. Grams frequent in a
  reference corpus (the seeds) sort last, so the indexed prefixes hold rare grams and postings stay short.
- `ContaminationIndex`: a question is contaminated when it contains any word n-gram (default 10) of an
  evaluation question, or the whole of an evaluation question shorter than n words, or equals one.
- `MinHashLSHIndex`: the near-duplicate index for the paper's scale (1.44M questions in bounded memory):
  MinHash-LSH candidates verified by the exact Jaccard of stored 32-bit gram hashes.
"""
import hashlib
import itertools
import math
import re
import unicodedata
from array import array
from collections import Counter, defaultdict

import numpy as np

_WORD = re.compile(r"[^\W_]+")


def words(text):
    """Lower-case word tokens (letters and digits; punctuation, $ and LaTeX backslashes dropped)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def normalise_text(text):
    """The text as single-spaced lower-case words: the key for exact-duplicate detection."""
    return " ".join(words(text))


def _hash(gram):
    return int.from_bytes(hashlib.blake2b("\x1f".join(gram).encode(), digest_size=8).digest(), "little")


def ngram_hashes(tokens, n):
    """Set of hashed word n-grams of a token list; a list shorter than n gives one gram, the whole list."""
    if not tokens:
        return set()
    if len(tokens) < n:
        return {_hash(tokens)}
    return {_hash(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a, b):
    """|a & b| / |a | b| of two sets (0 for two empty sets)."""
    if not a and not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


class NearDupIndex:
    """Exact and near-duplicate lookup over a growing set of texts.

    Args:
        n: word n-gram size.
        threshold: Jaccard similarity at or above which two texts are near duplicates (0 < threshold <= 1).
        reference: optional texts whose n-gram frequencies fix the global gram order (rare grams first);
            they are not added to the index.
    """

    def __init__(self, n=3, threshold=0.7, reference=()):
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.n, self.threshold = n, threshold
        self._freq = Counter()
        for text in reference:
            self._freq.update(ngram_hashes(words(text), n))
        self._grams = {}  # key -> frozenset of gram hashes
        self._exact = {}  # normalised text -> first key with that text
        self._text_of = {}  # key -> normalised text
        self._postings = defaultdict(set)  # gram hash -> keys whose prefix holds it

    def __len__(self):
        return len(self._grams)

    def _prefix(self, grams):
        ordered = sorted(grams, key=lambda g: (self._freq.get(g, 0), g))
        keep = len(ordered) - math.ceil(self.threshold * len(ordered) - 1e-9) + 1
        return ordered[:max(1, keep)]

    def query(self, text):
        """The closest indexed text that duplicates `text`.

        Returns:
            None, or (key, similarity): similarity 1.0 for an exact (normalised) match, else the Jaccard
            similarity of the best near duplicate.
        """
        tokens = words(text)
        exact = self._exact.get(" ".join(tokens))
        if exact is not None:
            return exact, 1.0
        grams = ngram_hashes(tokens, self.n)
        if not grams:
            return None
        candidates = set()
        for g in self._prefix(grams):
            candidates.update(self._postings.get(g, ()))
        best = None
        for key in candidates:
            sim = jaccard(grams, self._grams[key])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (key, sim)
        return best

    def add(self, key, text):
        """Index `text` under `key` (a key already present is replaced)."""
        if key in self._grams:
            self.remove(key)
        tokens = words(text)
        grams = frozenset(ngram_hashes(tokens, self.n))
        self._grams[key] = grams
        self._text_of[key] = " ".join(tokens)
        self._exact.setdefault(self._text_of[key], key)
        for g in self._prefix(grams):
            self._postings[g].add(key)

    def remove(self, key):
        """Forget `key` (no-op when absent)."""
        grams = self._grams.pop(key, None)
        if grams is None:
            return
        for g in self._prefix(grams):
            self._postings[g].discard(key)
        text = self._text_of.pop(key)
        if self._exact.get(text) == key:
            del self._exact[text]


class ContaminationIndex:
    """Word n-gram index of evaluation questions.

    Grams are 64-bit hashes of the word hashes (`combine_ngrams`); a query hashes its grams in one numpy pass
    and looks them up in a sorted array (rebuilt lazily after adds), so it costs tens of microseconds.

    Args:
        n: n-gram size; a question that shares any n-gram with an evaluation question is contaminated.
    """

    def __init__(self, n=10):
        self.n = n
        self._grams = {}  # gram hash -> source label of the first evaluation question holding it
        self._short = defaultdict(dict)  # length L < n -> {hash of the whole question: source}
        self._sorted = None  # [(length, sorted uint64 array of the keys)], built at the first query after an add
        self._memo = {}  # text -> answer, from `prepare`
        self.size = 0

    def add(self, text, source):
        """Index one evaluation question; `source` (any label, e.g. ("gsm8k_test.jsonl", 12)) is returned by `query`."""
        tokens = words(text)
        if not tokens:
            return
        self.size += 1
        self._sorted, self._memo = None, {}
        h = word_hash_array(tokens)
        if len(tokens) < self.n:
            self._short[len(tokens)].setdefault(int(combine_ngrams(h, len(tokens))[0]), source)
            return
        for g in combine_ngrams(h, self.n).tolist():
            self._grams.setdefault(g, source)

    def _tables(self):
        if self._sorted is None:  # n-grams first, as before, then the short questions
            self._sorted = [(length, np.sort(np.fromiter(table, dtype=np.uint64, count=len(table))))
                            for length, table in [(self.n, self._grams), *sorted(self._short.items())] if table]
        return self._sorted

    def prepare(self, texts):
        """Answer `query` for many texts in one vectorised pass (a downloaded batch file); same answers."""
        texts = list(dict.fromkeys(texts))
        self._memo = {}
        for i in range(0, len(texts), 512):
            chunk = texts[i:i + 512]
            arrays = word_hashes_many(chunk)
            lengths = np.array([len(a) for a in arrays], dtype=np.int64)
            answers = [None] * len(chunk)
            if lengths.any():
                h = np.concatenate(arrays)
                starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
                todo = np.ones(len(chunk), dtype=bool)
                for length, keys in self._tables():
                    if len(h) < length or not todo.any():
                        continue
                    g = combine_ngrams(h, length)
                    pos = np.arange(len(g))
                    seg = np.searchsorted(starts, pos, "right") - 1
                    idx = np.minimum(np.searchsorted(keys, g), len(keys) - 1)
                    hit = (keys[idx] == g) & (pos + length <= starts[seg] + lengths[seg]) & todo[seg]
                    table = self._grams if length == self.n else self._short[length]
                    for k in np.nonzero(hit)[0].tolist():  # the first hit of each text, in text order
                        t = seg[k]
                        if todo[t]:
                            todo[t] = False
                            answers[t] = table[int(g[k])]
            self._memo.update(zip(chunk, answers))

    def query(self, text):
        """The source label of an evaluation question that `text` overlaps, or None."""
        if text in self._memo:
            return self._memo[text]
        tokens = words(text)
        if not tokens:
            return None
        if self._sorted is None:  # n-grams first, as before, then the short questions
            self._sorted = [(length, np.sort(np.fromiter(table, dtype=np.uint64, count=len(table))))
                            for length, table in [(self.n, self._grams), *sorted(self._short.items())] if table]
        h = word_hash_array(tokens)
        for length, keys in self._sorted:
            if len(tokens) < length or not len(keys):
                continue
            g = combine_ngrams(h, length)
            idx = np.minimum(np.searchsorted(keys, g), len(keys) - 1)
            found = np.nonzero(keys[idx] == g)[0]
            if len(found):
                table = self._grams if length == self.n else self._short[length]
                return table[int(g[found[0]])]
        return None


# ---------------------------------------------------------------------------------------------------------------
# Bounded memory at the paper's scale (1.44M questions): MinHash-LSH candidates, verified by exact Jaccard.

_M1 = 0x9E3779B97F4A7C15  # odd 64-bit multipliers (golden ratio, splitmix64) for combining hashes
_M2 = 0xBF58476D1CE4E5B9
_M3 = 0x94D049BB133111EB
_SLOT_BITS = 27  # a band-table entry packs (band: 5 bits, band hash: 32 bits, slot: 27 bits) into one uint64
_DIR_BITS = 16  # the band-table directory has bands x 2**16 buckets
_BLOCK = 1 << 24  # gram hashes are stored in numpy blocks of 16M uint32 (64 MB)


def lsh_params(threshold, target=0.9995, max_bands=32, max_rows=16):
    """(bands, rows) with the most rows per band (fewest chance candidates) whose probability of making a pair of
    Jaccard `threshold` a candidate, 1 - (1 - t^rows)^bands, is at least `target`. For t = 0.7: (28, 4)."""
    best = (max_bands, 1)
    for rows in range(1, max_rows + 1):
        p = threshold ** rows
        if p >= 1:
            return 1, rows
        bands = math.ceil(math.log(1 - target) / math.log(1 - p))
        if bands <= max_bands:
            best = (bands, rows)
    return best


_WORD_CACHE = {}


def word_hash_array(tokens):
    """64-bit hashes (blake2b) of words as a uint64 array; a bounded cache keeps frequent words."""
    cache = _WORD_CACHE
    if len(cache) > 500_000:
        cache.clear()
    out = list(map(cache.get, tokens))
    if None in out:
        for i, (w, v) in enumerate(zip(tokens, out)):
            if v is None:
                v = cache.get(w)
                if v is None:
                    v = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                out[i] = v
    return np.array(out, dtype=np.uint64)


_HASH_MEMO = {}  # text -> its word hashes, for the texts of the last few `prepare` calls


def word_hashes_many(texts):
    """Per text, the uint64 hashes of its words; memoised for a few thousand texts, so the contamination and
    near-duplicate indexes preparing the same batch tokenise and hash each text once."""
    memo = _HASH_MEMO
    found = {t: memo[t] for t in texts if t in memo}
    missing = [t for t in dict.fromkeys(texts) if t not in found]
    if missing:
        if len(memo) + len(missing) > 8192:
            memo.clear()
        token_lists = [words(t) for t in missing]
        flat = word_hash_array([w for tokens in token_lists for w in tokens])
        end = 0
        for t, tokens in zip(missing, token_lists):
            found[t] = memo[t] = flat[end:end + len(tokens)]
            end += len(tokens)
    return [found[t] for t in texts]


_POW = np.ones(1, dtype=np.uint64)  # _M1 ** k and its inverse ** k (mod 2**64), grown on demand
_IPOW = np.ones(1, dtype=np.uint64)


def _powers(k):
    global _POW, _IPOW
    if len(_POW) <= k:
        size = max(k + 1, 2 * len(_POW), 4096)
        inv = pow(_M1, -1, 1 << 64)  # _M1 is odd, so invertible modulo 2**64
        pw, ipw = [1], [1]
        for _ in range(size - 1):
            pw.append(pw[-1] * _M1 & 0xFFFFFFFFFFFFFFFF)
            ipw.append(ipw[-1] * inv & 0xFFFFFFFFFFFFFFFF)
        _POW, _IPOW = np.array(pw, dtype=np.uint64), np.array(ipw, dtype=np.uint64)
    return _POW, _IPOW


def combine_ngrams(h, n):
    """(len(h) - n + 1,) uint64 hashes of the n-grams of a word-hash array, then mixed: the polynomial
    sum_j h[i + j] * M**(n - 1 - j) (mod 2**64), computed for every i at once from prefix sums,
    P[k] = M**k * cumsum(h[j] * M**-j), as P[i + n - 1] - M**n * P[i - 1]: a constant number of numpy calls
    whatever n is (decontamination uses 10-grams)."""
    m = len(h) - n + 1
    pw, ipw = _powers(len(h))
    prefix = np.cumsum(h * ipw[:len(h)], dtype=np.uint64) * pw[:len(h)]
    g = prefix[n - 1:].copy()
    g[1:] -= prefix[:m - 1] * pw[n]
    return _mix(g)


def _mix(x):
    """splitmix64 finaliser on a uint64 numpy array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(_M2)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(_M3)
    return x ^ (x >> np.uint64(31))


class MinHashLSHIndex:
    """Near-duplicate lookup over a growing set of texts in under 1 KB per text (measured by bench/synth_scale.py:
    1.3 GB peak RSS for the whole process at 1.44M GSM8K-like questions, with decontamination).

    Same interface and decisions as `NearDupIndex` up to the LSH recall (>= 99.95% at the threshold, more above):
    word n-grams are hashed to 32 bits and kept sorted per text (4 bytes per gram); `bands` x `rows` MinHash
    values (multiply-shift hashes of the 32-bit grams) give one 32-bit key per band; every key is packed with
    its band and slot into one uint64 of a sorted array (merged from a small dict of recent keys), so a lookup
    is one `searchsorted`. Candidates are verified by the exact Jaccard of their stored gram sets, so nothing
    below the threshold is ever reported. Everything is seeded: the same texts give the same answers in every
    process (a resumed run makes the same decisions).

    Args:
        n: word n-gram size.
        threshold: Jaccard similarity at or above which two texts are near duplicates.
        seed: seed of the MinHash permutations.
    """

    VERSION = "minhash-lsh+exact-jaccard-v1"

    def __init__(self, n=3, threshold=0.7, seed=1, pending_limit=1 << 20):
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.n, self.threshold, self.seed = n, threshold, seed
        self.bands, self.rows = lsh_params(threshold)
        rng = np.random.default_rng(seed)
        perms = self.bands * self.rows
        self._a = rng.integers(1, 2**63, size=perms, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self._b = rng.integers(0, 2**63, size=perms, dtype=np.uint64)
        self._band_tag = (np.arange(self.bands, dtype=np.uint64) << np.uint64(32 + _SLOT_BITS))
        self._blocks = [np.empty(_BLOCK, dtype=np.uint32)]  # gram hashes, each text contiguous in one block
        self._fill = 0  # used length of the last block
        self._where = array("Q")  # slot -> block << 32 | offset
        self._len = array("I")  # slot -> number of grams
        self._alive = bytearray()
        self._keys = []  # slot -> key
        self._slot = {}  # key -> slot (live keys)
        self._table = np.empty(0, dtype=np.uint64)  # sorted (band, band hash, slot) entries
        # directory: entries of (band, top 16 bits of the band hash) d lie at _table[_dir[d]:_dir[d + 1]], a few
        # dozen at most, so a lookup touches a few cache lines instead of binary-searching 40M entries
        self._counts = np.zeros(self.bands << _DIR_BITS, dtype=np.int64)
        self._dir = np.zeros((self.bands << _DIR_BITS) + 1, dtype=np.int64)
        self._pending = {}  # band | hash prefix (int) -> slot (or list of slots), not yet merged into _table
        self._pending_n, self._pending_limit = 0, pending_limit
        self._memo = {}  # text -> (grams, band prefixes): query-then-add and `prepare` hash once

    @classmethod
    def describe_params(cls, n, threshold, seed=1):
        bands, rows = lsh_params(threshold)
        return {"algorithm": cls.VERSION, "ngram": n, "threshold": threshold, "bands": bands, "rows": rows,
                "seed": seed}

    def describe(self):
        return self.describe_params(self.n, self.threshold, self.seed)

    def __len__(self):
        return len(self._slot)

    def __getstate__(self):  # the snapshot: the memo is dropped, the last block cut to its used length
        state = dict(self.__dict__)
        state["_memo"] = {}
        state["_blocks"] = self._blocks[:-1] + [self._blocks[-1][:self._fill].copy()]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        last = np.empty(_BLOCK, dtype=np.uint32)
        last[:self._fill] = self._blocks[-1]
        self._blocks[-1] = last

    # ---- hashing ----------------------------------------------------------------------------------------------
    def prepare(self, texts):
        """Sketch many texts in one vectorised pass (numpy's per-call cost shared); `query`/`add` of these texts
        then reuse the sketches. Sketches are pure functions of the text: decisions are unchanged."""
        todo = list(dict.fromkeys(texts))
        self._memo = {}  # only the texts about to be looked up: the sketches are views of shared chunk arrays
        for i in range(0, len(todo), 256):  # temporaries of 256 texts x ~60 grams x perms x 8 bytes fit a cache
            chunk = todo[i:i + 256]
            self._memo.update(zip(chunk, self._sketch_many(chunk)))

    def _sketch(self, text):
        """(sorted unique uint32 gram hashes, band prefixes as uint64 or None) of one text."""
        hit = self._memo.get(text)
        if hit is None:
            if len(self._memo) > 4096:
                self._memo.clear()
            hit = self._memo[text] = self._sketch_many([text])[0]
        return hit

    def _sketch_many(self, texts):
        arrays = word_hashes_many(texts)
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        out = [(np.empty(0, dtype=np.uint32), None)] * len(texts)
        if not lengths.any():
            return out
        h = np.concatenate(arrays)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        n = self.n
        # full n-grams over the concatenation, kept where they lie inside one text
        seg_parts, gram_parts = [], []
        if len(h) >= n:
            g = combine_ngrams(h, n)
            pos = np.arange(len(g))
            seg = np.searchsorted(starts, pos, "right") - 1
            inside = pos + n <= starts[seg] + lengths[seg]
            seg_parts.append(seg[inside])
            gram_parts.append(g[inside])
        short = np.nonzero((lengths > 0) & (lengths < n))[0]
        for t in short:  # a text shorter than n words is one gram, the whole text
            seg_parts.append(np.array([t]))
            gram_parts.append(combine_ngrams(h[starts[t]:starts[t] + lengths[t]], int(lengths[t])))
        seg = np.concatenate(seg_parts).astype(np.uint64)
        g32 = (np.concatenate(gram_parts) >> np.uint64(32)).astype(np.uint64)
        both = np.unique((seg << np.uint64(32)) | g32)  # sorted by text, then gram; duplicates gone
        seg, grams = (both >> np.uint64(32)).astype(np.int64), (both & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        present = np.unique(seg)
        bounds = np.searchsorted(seg, present)
        hv = np.multiply(grams.astype(np.uint64)[:, None], self._a)  # (grams, perms), in place from here
        hv += self._b
        hv >>= np.uint64(32)
        mins = np.minimum.reduceat(hv, bounds, axis=0).reshape(len(present), self.bands, self.rows)
        key = mins[:, :, 0].copy()
        for r in range(1, self.rows):
            key = key * np.uint64(_M1) + mins[:, :, r]
        prefixes = self._band_tag | ((_mix(key) >> np.uint64(32)) << np.uint64(_SLOT_BITS))  # (texts, bands)
        ends = np.append(bounds[1:], len(grams))
        for k, t in enumerate(present.tolist()):
            out[t] = (grams[bounds[k]:ends[k]], prefixes[k])
        return out

    def _grams_of(self, slot):
        where = self._where[slot]
        off = where & 0xFFFFFFFF
        return self._blocks[where >> 32][off:off + self._len[slot]]

    # ---- queries ----------------------------------------------------------------------------------------------
    def query(self, text):
        """The closest indexed text that duplicates `text`: None or (key, Jaccard similarity >= threshold).
        Ties go to the earliest added text."""
        grams, prefixes = self._sketch(text)
        if prefixes is None:
            return None
        candidates = set()
        if len(self._table):
            d = (prefixes >> np.uint64(_SLOT_BITS + 32 - _DIR_BITS)).astype(np.int64)
            lo, hi = self._dir[d], self._dir[d + 1]
            width = int((hi - lo).max())
            if width:
                steps = np.arange(width)
                vals = self._table[np.minimum(lo[:, None] + steps, len(self._table) - 1)]  # (bands, width)
                match = (steps < (hi - lo)[:, None]) & ((vals >> np.uint64(_SLOT_BITS))
                                                          == (prefixes >> np.uint64(_SLOT_BITS))[:, None])
                candidates.update((vals[match] & np.uint64((1 << _SLOT_BITS) - 1)).tolist())
        for hit in map(self._pending.get, prefixes.tolist()):
            if hit is not None:
                candidates.update(hit if isinstance(hit, list) else (hit,))
        best = None
        for slot in sorted(candidates):
            if not self._alive[slot]:
                continue
            other = self._grams_of(slot)
            both = np.concatenate((grams, other))
            both.sort()
            inter = int(np.count_nonzero(both[1:] == both[:-1]))
            sim = inter / (len(grams) + len(other) - inter)
            if sim >= self.threshold - 1e-12 and (best is None or sim > best[1]):
                best = (self._keys[slot], sim)
        return best

    def add(self, key, text):
        """Index `text` under `key` (a key already present is replaced)."""
        if key in self._slot:
            self.remove(key)
        grams, prefixes = self._sketch(text)
        slot = len(self._keys)
        if slot >= 1 << _SLOT_BITS:
            raise ValueError(f"MinHashLSHIndex holds at most {1 << _SLOT_BITS} texts")
        if self._fill + len(grams) > _BLOCK:
            self._blocks.append(np.empty(_BLOCK, dtype=np.uint32))
            self._fill = 0
        self._blocks[-1][self._fill:self._fill + len(grams)] = grams
        self._where.append((len(self._blocks) - 1) << 32 | self._fill)
        self._len.append(len(grams))
        self._fill += len(grams)
        self._alive.append(1)
        self._keys.append(key)
        self._slot[key] = slot
        if prefixes is not None:
            plist = prefixes.tolist()
            pending = self._pending
            if pending.keys().isdisjoint(plist):  # the common case: one C-level update
                pending.update(zip(plist, itertools.repeat(slot)))
            else:
                for p in plist:
                    old = pending.get(p)
                    pending[p] = slot if old is None else (old + [slot] if isinstance(old, list) else [old, slot])
            self._pending_n += len(plist)
            if self._pending_n >= self._pending_limit:
                self._merge()

    def _merge(self):
        new = np.array(sorted(p | s for p, v in self._pending.items() for s in (v if isinstance(v, list) else (v,))),
                       dtype=np.uint64)
        self._table = np.insert(self._table, np.searchsorted(self._table, new), new)
        self._counts += np.bincount((new >> np.uint64(_SLOT_BITS + 32 - _DIR_BITS)).astype(np.int64),
                                    minlength=len(self._counts))
        np.cumsum(self._counts, out=self._dir[1:])
        self._pending.clear()
        self._pending_n = 0

    def remove(self, key):
        """Forget `key` (no-op when absent); its table entries stay and are skipped."""
        slot = self._slot.pop(key, None)
        if slot is not None:
            self._alive[slot] = 0
