"""The CLIP tokenizer against open_clip's copy of OpenAI's SimpleTokenizer and transformers' CLIPTokenizer."""
from __future__ import annotations

import html
import importlib.util
import json
import random
import string
import time
from pathlib import Path

import ftfy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sdport.models import tokenizer as tk
from sdport.models.tokenizer import END, LENGTH, START, VOCAB_SIZE, Tokenizer, default_tokenizer

CORPUS = [line for line in (Path(__file__).parent / "data" / "prompts.txt").read_text("utf-8").split("\n") if line]

# whitespace and control characters the corpus file cannot hold cleanly
GENERATED = [
    "a photo\tof a cat",
    "line one\nline two\r\nline three\rfour",
    "  leading and trailing spaces  ",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space 猫\u3000犬",
    "thin\u2009space and em\u2003space",
    "vertical\x0btab and form\x0cfeed",
    "file\x1cgroup\x1drecord\x1eunit\x1fseparators",
    "nul\x00char and bell\x07 and escape\x1b[0m",
    "del\x7f and c1\x85next line\x9f",
    "line\u2028separator\u2029paragraph",
    "\ufeffbyte order mark",
    "combining e\u0301 vs precomposed \u00e9",
    "right\u200fto\u200eleft marks",
    "\n\n\t  \n",
    "",
    " ",
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return default_tokenizer()


@pytest.fixture(scope="module")
def openclip():
    """open_clip's SimpleTokenizer, loaded from its file: importing the open_clip package pulls torchvision."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_openclip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)  # imports only stdlib, ftfy, regex, numpy, torch
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' CLIPTokenizer over the same vocabulary, built offline, padded as in SD v1."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("clip_vocab")
    merges = tk.load_merges()
    chars = list(tk.byte_to_char().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    tok = transformers.CLIPTokenizer.from_pretrained(str(d), pad_token="<|endoftext|>")
    assert tok.pad_token_id == END and tok.bos_token_id == START and tok.eos_token_id == END
    return tok


def hf_framed(tok, text: str) -> list[int]:
    # as CompVis' FrozenCLIPEmbedder calls it
    enc = tok(text, truncation=True, max_length=77, return_length=True, return_overflowing_tokens=False,
              padding="max_length")
    return list(enc["input_ids"])


def openclip_framed(ref, text: str) -> list[int]:
    # open_clip truncates like CompVis ([SOT] + 75 + [EOT]) but pads with 0; SD v1 pads with END
    ids = [ref.sot_token_id] + ref.encode(text) + [ref.eot_token_id]
    if len(ids) > LENGTH:
        ids = ids[: LENGTH - 1] + [ref.eot_token_id]
    return ids + [END] * (LENGTH - len(ids))


# ---------------------------------------------------------------- the corpus itself


def test_corpus_covers_the_cases(ours):
    assert len(CORPUS) >= 300
    assert len(set(CORPUS)) == len(CORPUS)
    assert sum(len(ours.encode(p)) > 75 for p in CORPUS) >= 20, "over-long prompts"
    assert any("&amp;amp;" in p for p in CORPUS) and any("Ã©" in p for p in CORPUS)
    assert any("(" in p and ":1." in p for p in CORPUS) and any("http" in p for p in CORPUS)
    assert any(ord(c) > 0xFFFF for p in CORPUS for c in p), "astral-plane characters (emoji)"
    assert any("\u4e00" <= c <= "\u9fff" for p in CORPUS for c in p), "CJK"


# ---------------------------------------------------------------- reference 1: open_clip


def test_encode_matches_openclip_on_corpus(ours, openclip):
    mismatched = [p for p in CORPUS + GENERATED if ours.encode(p) != openclip.encode(p)]
    assert not mismatched, f"{len(mismatched)} prompts differ, first: {mismatched[0]!r}"


def test_framing_matches_openclip_on_corpus(ours, openclip):
    for p in CORPUS + GENERATED:
        ids, truncated = ours.framed(p)
        assert ids == openclip_framed(openclip, p), p
        assert truncated == (len(openclip.encode(p)) > 75), p


def test_sd2_framing_is_open_clip_tokenize_on_corpus(ours, openclip):
    """SD 2.x feeds open_clip.tokenize's ids (SimpleTokenizer.__call__): pad 0, a cut prompt ends with END."""
    for p in CORPUS + GENERATED:
        ids = ours(p, pad=0)
        assert ids == openclip(p)[0].tolist(), p
        assert ids[min(len(ours.encode(p)), 75) + 1] == END
    last = {ours(p, pad=0)[-1] for p in CORPUS}
    assert last == {0, END}  # the corpus has padded prompts and cut ones


def test_vocabulary_matches_openclip(ours, openclip):
    # open_clip names its special tokens <start_of_text>/<end_of_text>; same ids
    assert ours.decoder[:-2] == [openclip.decoder[i] for i in range(VOCAB_SIZE - 2)]
    assert (openclip.sot_token_id, openclip.eot_token_id) == (START, END)


def test_bpe_matches_openclip_on_random_words(ours, openclip):
    # the heap-ordered merge must equal CLIP's "merge every occurrence of the best pair" loop
    rng = random.Random(0)
    alphabet = string.ascii_lowercase + "éß中😀'.,"
    to_char = tk.byte_to_char()
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 100)))
        word = "".join(to_char[b] for b in text.encode("utf-8"))
        assert " ".join(ours._bpe(word)) == openclip.bpe(word), text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_encode_matches_openclip_on_arbitrary_text(ours, openclip, text):
    # the one deliberate difference: literal special-token text (see the transformers tests)
    cleaned = tk.clean(text)
    assume(not any(s in cleaned for s in ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")))
    assert ours.encode(text) == openclip.encode(text)


# ---------------------------------------------------------------- reference 2: transformers


def _cleaning_is_a_no_op(text: str) -> bool:
    """transformers' CLIPTokenizer (tokenizers backend) skips ftfy and HTML unescaping, and lowercases
    one character at a time (str.lower() turns a word-final Σ into ς)."""
    return (
        html.unescape(html.unescape(ftfy.fix_text(text))) == text
        and text.lower() == "".join(c.lower() for c in text)
    )


def test_framing_matches_transformers(ours, hf):
    compared = [p for p in CORPUS if _cleaning_is_a_no_op(p)]
    assert len(compared) >= 250
    for p in compared:
        assert ours(p) == hf_framed(hf, p), p


def test_literal_special_tokens_match_transformers(ours, hf):
    # CompVis' tokenizer turns the literal special-token text into the special ids (open_clip does not)
    for p in ["<|endoftext|>", "a <|startoftext|> b", "cat<|endoftext|>dog", "x <|endoftext|><|endoftext|>"]:
        assert ours(p) == hf_framed(hf, p), p
    assert ours.encode("a <|endoftext|> b") == [320, END, 321]


def test_ids_are_those_of_sd_v1(ours):
    # known ids of the CLIP vocabulary (as in every SD v1 prompt dump)
    assert ours("a photograph of an astronaut riding a horse")[:10] == [
        49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


# ---------------------------------------------------------------- framing, decode, display


def test_framing_boundaries(ours):
    for n, truncated in [(0, False), (1, False), (74, False), (75, False), (76, True), (200, True)]:
        ids, cut = ours.framed("the " * n)
        assert len(ids) == LENGTH and ids[0] == START and cut is truncated
        body = ids[1 : 1 + min(n, 75)]
        assert body == [518] * min(n, 75)  # 'the</w>'
        assert ids[1 + min(n, 75) :] == [END] * (LENGTH - 1 - min(n, 75))
    assert ours("") == [START] + [END] * 76


def test_pretokenisation_keeps_punctuation_runs(ours):
    # the special-token alternatives are escaped: "<" joins the punctuation run, as in transformers
    assert list(ours.pieces("a <- b </div> >>")) == ["a", "<-", "b", "</", "div", ">", ">>"]
    assert list(ours.pieces("It's (MASTERPIECE:1.2)")) == ["it", "'s", "(", "masterpiece", ":", "1", ".", "2", ")"]


def test_tokens_and_decode(ours):
    ids = ours.encode("A photograph of an astronaut 😀, café!")
    assert ours.tokens(ids)[:3] == ["a</w>", "photograph</w>", "of</w>"]
    assert ours.decode(ids) == "a photograph of an astronaut 😀, café !"  # "😀," is one punctuation run
    assert ours.decode(ours("a cat")) == "a cat"
    assert ours.decode(ours("a cat"), skip_special=False).startswith("<|startoftext|> a cat <|endoftext|>")
    for p in CORPUS:
        ids = ours.encode(p)
        assert ours.encode(ours.decode(ids)) == ids, p
    with pytest.raises(ValueError, match="49408"):
        ours.tokens([49408])
    with pytest.raises(ValueError, match="-1"):
        ours.decode([-1])


def test_default_tokenizer_is_cached():
    assert default_tokenizer() is default_tokenizer()


def test_rejects_a_foreign_merges_list():
    with pytest.raises(ValueError, match="48894"):
        Tokenizer([("a", "b")])
    merges = tk.load_merges()
    k = next(r for r, m in enumerate(merges) if "".join(merges[0]) in m)  # first merge that uses merge 0
    with pytest.raises(ValueError, match="before a merge makes it"):
        Tokenizer([merges[k], *merges[:k], *merges[k + 1 :]])


# ---------------------------------------------------------------- robustness


def _check_framed(ids: list[int]) -> None:
    assert len(ids) == LENGTH
    assert ids[0] == START and ids[-1] == END
    assert all(isinstance(i, int) and 0 <= i < VOCAB_SIZE for i in ids)


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_never_raises_on_arbitrary_text(ours, text):
    ids, truncated = ours.framed(text)
    _check_framed(ids)
    body = ours.encode(text)
    assert ids[1 : 1 + min(len(body), 75)] == body[:75]
    assert truncated == (len(body) > 75)
    ours.decode(ids)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.one_of(
    st.characters(categories=["Cs"]),  # lone (and accidentally paired) surrogates
    st.characters(max_codepoint=0x9F),  # C0/C1 controls, NUL
    st.characters(),
)))
def test_never_raises_with_surrogates_and_controls(ours, text):
    _check_framed(ours(text))
    ours.decode(ours.encode(text))


def test_hostile_inputs(ours):
    for text in ["\ud800", "a\udfffb", "\ud83d\ude00", "\x00" * 10, "".join(map(chr, range(32))),
                 "\U0010ffff", "\ufffe\uffff", "e" + "\u0301" * 500, "&#xd800;&#0;&#x110000;", "🏳️‍🌈" * 200]:
        _check_framed(ours(text))
        ours.decode(ours.encode(text))


def test_huge_inputs_are_fast(ours):
    rng = random.Random(1)
    many_words = " ".join(rng.choice(["cat", "dog", "photo", "a", "of"]) for _ in range(500_000))
    one_word = "".join(rng.choice(string.ascii_lowercase) for _ in range(100_000))
    t0 = time.perf_counter()
    ids, truncated = ours.framed(many_words)
    _check_framed(ids)
    assert truncated
    ids, truncated = ours.framed(one_word)
    _check_framed(ids)
    assert truncated
    # CLIP's reference loop is quadratic in the word length (about 30 s for 50k letters)
    assert time.perf_counter() - t0 < 10
