"""CLIP's byte-level BPE tokenizer, framed the way Stable Diffusion v1 feeds its text encoder.

    text -> ftfy.fix_text -> html.unescape twice -> collapse whitespace -> lowercase
         -> split with CLIP's pre-tokenisation regex
         -> each piece's UTF-8 bytes mapped to printable characters, '</w>' on the last one
         -> BPE merges (lowest rank first) -> vocabulary ids

Framing follows CompVis' FrozenCLIPEmbedder (transformers' CLIPTokenizer with truncation=True,
max_length=77, padding="max_length", pad token <|endoftext|>):
[START] + at most 75 ids + [END], padded with END to 77. SD 2.x frames as `open_clip.tokenize` does:
the same, padded with 0 (`pad`; the text encoder's config carries its pad id).

bpe_simple_vocab_16e6.txt.gz is OpenAI CLIP's BPE vocabulary (MIT License, Copyright (c) 2021
OpenAI, https://github.com/openai/CLIP), shipped unchanged.
"""
from __future__ import annotations

import gzip
import heapq
import html
import itertools
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import ftfy
import regex

START = 49406  # <|startoftext|>
END = 49407  # <|endoftext|>, also the padding id in SD v1
LENGTH = 77  # context length of CLIP's text encoder
VOCAB_SIZE = 49408
BUNDLED_VOCAB = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

START_TEXT, END_TEXT = "<|startoftext|>", "<|endoftext|>"
N_MERGES = VOCAB_SIZE - 512 - 2  # 48894: 256 byte symbols, 256 with '</w>', 2 special tokens
_MAX_BODY = LENGTH - 2  # ids between START and END

# CLIP's pre-tokenisation regex. The special-token alternatives are escaped here, as in
# transformers' CLIPTokenizer (what CompVis ran) and open_clip; OpenAI's original leaves the '|'
# unescaped, which makes a lone '<' or '>' its own piece ("<-" -> "<", "-" instead of "<-").
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# literal special-token text becomes the special id (matched after lowercasing), as in CompVis' tokenizer
_SPECIAL = {START_TEXT: START, END_TEXT: END}
_CACHED_WORD_LEN = 128  # longer pieces are merged every time rather than kept in the cache


@lru_cache()
def byte_to_char() -> dict[int, str]:
    """The reversible byte -> character map BPE runs on: printable Latin-1 bytes stand for
    themselves, the other 68 bytes (space, controls, ...) move to U+0100 onwards. The order
    (printable bytes first, then the others) is the order of the first 256 vocabulary ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = [b for b in range(256) if b not in table]
    for n, b in enumerate(extra):
        table[b] = chr(256 + n)
    return table


def load_merges(path: str | Path = BUNDLED_VOCAB) -> list[tuple[str, str]]:
    """The merge rules of a CLIP BPE file: lines 1..48894 (line 0 is a version header)."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]


def clean(text: str) -> str:
    """CLIP's text normalisation: fix mojibake, unescape HTML (twice), collapse whitespace, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class Tokenizer:
    """OpenAI CLIP's simple tokenizer over a list of merge rules (`Tokenizer.from_file()` reads them)."""

    def __init__(self, merges: Sequence[tuple[str, str]]):
        if len(merges) != N_MERGES:
            raise ValueError(f"expected {N_MERGES} BPE merges, got {len(merges)}")
        symbols = list(byte_to_char().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_TEXT, END_TEXT]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = vocab
        if len(self.encoder) != VOCAB_SIZE:
            raise ValueError(f"BPE merges produce duplicate tokens: {VOCAB_SIZE - len(self.encoder)} repeated")
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self._check_merge_order(merges, set(symbols) | {s + "</w>" for s in symbols})
        self._byte_to_char = byte_to_char()
        self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
        self._bpe_cached = lru_cache(maxsize=1 << 16)(self._bpe)

    @classmethod
    def from_file(cls, path: str | Path = BUNDLED_VOCAB) -> "Tokenizer":
        return cls(load_merges(path))

    def _check_merge_order(self, merges, base: set[str]) -> None:
        # _bpe merges the lowest-ranked pair with a heap, which equals CLIP's "merge every occurrence
        # of the best pair, then look again" only if every merge's parts exist before it.
        made_at = {"".join(m): r for r, m in enumerate(merges)}
        for r, (a, b) in enumerate(merges):
            for part in (a, b):
                if part not in base and made_at.get(part, r) >= r:
                    raise ValueError(f"BPE merge {r} ({a!r}, {b!r}) uses {part!r} before a merge makes it")

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge one pre-token (already in byte characters) into vocabulary strings."""
        symbols: list[str | None] = [*word[:-1], word[-1] + "</w>"]
        n = len(symbols)
        # doubly linked list over symbol slots; a merge folds the right slot into the left one
        nxt = [*range(1, n), -1]
        prv = [*range(-1, n - 1)]
        ranks = self.ranks
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            # stale entry: slot i was folded away or its pair changed since it was pushed
            if symbols[i] is None or j < 0 or ranks.get((symbols[i], symbols[j])) != r:
                continue
            symbols[i] = symbols[i] + symbols[j]
            symbols[j] = None
            k = nxt[i] = nxt[j]
            if k >= 0:
                prv[k] = i
                if (rk := ranks.get((symbols[i], symbols[k]))) is not None:
                    heapq.heappush(heap, (rk, i))
            p = prv[i]
            if p >= 0 and (rp := ranks.get((symbols[p], symbols[i]))) is not None:
                heapq.heappush(heap, (rp, p))
        return tuple(s for s in symbols if s is not None)

    def pieces(self, text: str) -> Iterator[str]:
        """The pre-tokens of `text` after cleaning."""
        return (m.group() for m in _PATTERN.finditer(clean(text)))

    def _ids(self, text: str) -> Iterator[int]:
        """Ids of `text`, lazily, so framing a huge prompt stops after the first 76."""
        to_char = self._byte_to_char
        for piece in self.pieces(text):
            if piece in _SPECIAL:
                yield _SPECIAL[piece]
                continue
            # surrogatepass: a lone surrogate that survived cleaning still maps to bytes
            word = "".join(to_char[b] for b in piece.encode("utf-8", "surrogatepass"))
            merged = self._bpe_cached(word) if len(word) <= _CACHED_WORD_LEN else self._bpe(word)
            yield from (self.encoder[s] for s in merged)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without START/END."""
        return list(self._ids(text))

    def framed(self, text: str, pad: int = END) -> tuple[list[int], bool]:
        """The 77 ids CompVis feeds the text encoder, and whether the prompt was cut to fit. A cut prompt
        keeps END last (open_clip.tokenize cuts to 77 and writes END over the last kept id: the same ids)."""
        body = list(itertools.islice(self._ids(text), _MAX_BODY + 1))
        truncated = len(body) > _MAX_BODY
        ids = [START, *body[:_MAX_BODY], END]
        return ids + [pad] * (LENGTH - len(ids)), truncated

    def __call__(self, text: str, pad: int = END) -> list[int]:
        return self.framed(text, pad)[0]

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary strings of `ids` (byte characters, '</w>' ends a word), for display."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} outside the vocabulary [0, {VOCAB_SIZE})")
            out.append(self.decoder[i])
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; '</w>' becomes a space, invalid UTF-8 becomes U+FFFD."""
        data = bytearray()
        for s in self.tokens(ids):
            if s in _SPECIAL:
                if not skip_special:
                    data += s.encode() + b" "
                continue
            word_end = s.endswith("</w>")
            data += bytes(self._char_to_byte[c] for c in (s[:-4] if word_end else s))
            if word_end:
                data += b" "
        return data.decode("utf-8", "replace").strip()


@lru_cache()
def default_tokenizer() -> Tokenizer:
    """The tokenizer over the bundled CLIP vocabulary, built once per process."""
    return Tokenizer.from_file()
