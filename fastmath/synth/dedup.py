"""Text normalisation, near-duplicate search and decontamination by word n-grams. Pure Python.

- `NearDupIndex`: exact match of normalised text, and near duplicates by the Jaccard similarity of word
  n-gram sets (default 3-grams, threshold 0.7). Prefix filtering (Bayardo et al., "Scaling up all pairs
  similarity search", 2007) keeps it sub-quadratic: with one global order of n-grams, two sets with
  Jaccard >= t must share a gram within the first |A| - ceil(t|A|) + 1 grams of each, so only those
  prefixes are put in the inverted index; candidates are then checked exactly. Grams frequent in a
  reference corpus (the seeds) sort last, so the indexed prefixes hold rare grams and postings stay short.
- `ContaminationIndex`: a question is contaminated when it contains any word n-gram (default 10) of an
  evaluation question, or the whole of an evaluation question shorter than n words, or equals one.
"""
import hashlib
import math
import re
import unicodedata
from collections import Counter, defaultdict

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

    Args:
        n: n-gram size; a question that shares any n-gram with an evaluation question is contaminated.
    """

    def __init__(self, n=10):
        self.n = n
        self._grams = {}  # gram hash -> source label of the first evaluation question holding it
        self._short = defaultdict(dict)  # length L < n -> {hash of the whole question: source}
        self.size = 0

    def add(self, text, source):
        """Index one evaluation question; `source` (any label, e.g. ("gsm8k_test.jsonl", 12)) is returned by `query`."""
        tokens = words(text)
        if not tokens:
            return
        self.size += 1
        if len(tokens) < self.n:
            self._short[len(tokens)].setdefault(_hash(tokens), source)
            return
        for g in ngram_hashes(tokens, self.n):
            self._grams.setdefault(g, source)

    def query(self, text):
        """The source label of an evaluation question that `text` overlaps, or None."""
        tokens = words(text)
        for g in ngram_hashes(tokens, self.n) if len(tokens) >= self.n else ():
            source = self._grams.get(g)
            if source is not None:
                return source
        for length, table in self._short.items():
            for i in range(len(tokens) - length + 1):
                source = table.get(_hash(tokens[i:i + length]))
                if source is not None:
                    return source
        return None
