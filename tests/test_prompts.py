"""HoloCine prompts and text windows, against the official character-span rules and the official
prompter's cleaning (ftfy + whitespace), written out here.

Tokenizers are trained in the test on a few sentences (no network).
"""
import html
import json
import re

import ftfy
import numpy as np
import pytest
import regex
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from holocine_jax.prompts import build_prompt, parse_prompt, text_windows
from holocine_jax.shots import ShotLayout
from holocine_jax.text.tokenizer import load_tokenizer, tokenize

CORPUS = [
    "The scene is set in a bright kitchen. A round red character with stripes.",
    "Medium shot of the character entering from the left, looking around.",
    "Close-up of an empty glass on the table. The character pours water.",
    "Wide shot: the full glass, the character smiles. A dog runs; a cat sits.",
    "[global caption] [per shot caption] [shot cut] This scene contains 2 3 4 5 shots.",
]
SPECIALS = ["<pad>", "</s>", "<unk>"]
CAPTIONS = [
    ("A bright kitchen with a round red character.",
     ["Medium shot of the character entering from the left.", "Close-up of an empty glass.",
      "Wide shot: the character pours water, the glass is full."]),
    ("The scene is set in a kitchen. This scene contains 2 shots.",
     ["A dog runs.", "A cat sits; the character smiles."]),
    ("A room.", ["The character, looking around."]),
]


def _with_eos(tok):
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", eos)])
    return tok


def unigram_tokenizer():
    """SentencePiece-like (Metaspace) Unigram tokenizer with a trailing </s>, like UMT5's."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 4, trainers.UnigramTrainer(
        vocab_size=150, special_tokens=SPECIALS, unk_token="<unk>"))
    return _with_eos(tok)


def word_tokenizer():
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return _with_eos(tok)


def bpe_as_transformers():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=_with_eos(tok), pad_token="<pad>",
                                   eos_token="</s>")


def official_mask(prompt, offsets, text_len):
    """HoloCine's prompter + model_fn rules, written out: [num_shots, text_len] bool."""
    g = re.search(r"\[global caption\]", prompt)
    p = re.search(r"\[per shot caption\]", prompt)
    spans = [(-1, g.start(), p.start())]
    cur, sid = p.start(), 0
    for m in re.finditer(r"\[shot cut\]", prompt):
        spans.append((sid, cur, m.end()))
        cur, sid = m.end(), sid + 1
    if cur < len(prompt):
        spans.append((sid, cur, len(prompt)))
    ids = np.full(len(offsets), -2)
    for i, (a, b) in enumerate(offsets):
        if a == b:
            continue
        for span_id, s, e in spans:
            if not (b <= s or a >= e):
                ids[i] = span_id
                break
    where = lambda x: np.nonzero(ids == x)[0]
    g0, g1 = where(-1).min(), where(-1).max() + 1
    shots = [(where(i).min(), where(i).max() + 1) for i in range(ids.max() + 1)]
    glob = np.zeros(text_len, bool)
    glob[g0:g1 + 1] = True
    pad = np.zeros(text_len, bool)
    pad[max([g1] + [e for _, e in shots]) + 1:] = True
    table = np.zeros((len(shots), text_len), bool)
    for s, (a, e) in enumerate(shots):
        table[s, a:e + 1] = True
    return table | glob | pad


def offsets_of(tok, prompt):
    if isinstance(tok, Tokenizer):
        return tok.encode(prompt).offsets
    return tok(prompt, return_offsets_mapping=True)["offset_mapping"]


@pytest.mark.parametrize("make", [unigram_tokenizer, word_tokenizer, bpe_as_transformers])
def test_windows_equal_the_official_rules_token_by_token(make):
    tok = make()
    for glob, shots in CAPTIONS:
        prompt = build_prompt(glob, shots)
        text_len = len(offsets_of(tok, prompt)) + 5
        tw = text_windows(prompt, tok, num_shots=len(shots), text_len=text_len)
        layout = ShotLayout.from_latent_cuts(len(shots), range(1, len(shots)), latent_hw=(1, 1),
                                             max_shots=6, text_windows=tw.windows,
                                             text_pad_start=tw.pad_start)
        ours = np.asarray(layout.cross_attention_mask(text_len))  # frame k = shot k
        want = official_mask(prompt, offsets_of(tok, prompt), text_len)
        np.testing.assert_array_equal(ours, want, err_msg=prompt)


def test_windows_of_a_word_level_prompt_by_hand():
    prompt = build_prompt("A room.", ["Cat sits.", "Dog runs."])
    assert prompt == ("[global caption] A room. This scene contains 2 shots. [per shot caption] "
                      "Cat sits. [shot cut] Dog runs.")
    # Tokens: 0-3 "[global caption]", 4-12 global text, 13-17 "[per shot caption]", 18-20
    # "Cat sits.", 21-24 "[shot cut]", 25-27 "Dog runs.", 28 "</s>" (no characters).
    tw = text_windows(prompt, word_tokenizer(), text_len=32)
    # One past the end included: global [0, 13] , shot 0 [13, 25], shot 1 [25, 28].
    np.testing.assert_array_equal(tw.windows, [[0, 14], [13, 26], [25, 29]])
    assert tw.pad_start == 29 and tw.num_tokens == 29


def test_build_and_parse_round_trip():
    for glob, shots in CAPTIONS:
        prompt = build_prompt(glob, shots)
        assert prompt.count("[shot cut]") == len(shots) - 1
        assert f"This scene contains {len(shots)} shots." in prompt or "contains 2 shots" in glob
        got_glob, got_shots = parse_prompt(prompt)
        assert got_shots == shots
        assert got_glob == re.sub(r"\s*This scene contains \d+ shots\.$", "", glob)
    messy = "[global caption]  a  b [per shot caption] c [shot cut]d"
    assert parse_prompt(messy) == ("a b", ["c", "d"])


def test_errors():
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="caption of shot 1 is empty"):
        build_prompt("A room.", ["Cat sits.", "  "])
    with pytest.raises(ValueError, match="global caption is empty"):
        build_prompt(" ", ["Cat sits."])
    with pytest.raises(ValueError, match="2 shot captions but the layout 3 shots"):
        text_windows(build_prompt("A room.", ["Cat sits.", "Dog runs."]), tok, num_shots=3)
    with pytest.raises(ValueError, match="caption of shot 1 is empty"):
        text_windows("[global caption] A room. [per shot caption] Cat sits. [shot cut]", tok)
    with pytest.raises(ValueError, match="not a HoloCine prompt"):
        parse_prompt("A cat sits.")
    long = build_prompt("A room.", ["Cat sits.", "Dog runs. " * 10])
    n = len(tok.encode(long).ids)
    with pytest.raises(ValueError, match=f"{n} tokens, 5 more than text_len={n - 5}: "
                                         "truncation would cut shot 1's caption"):
        text_windows(long, tok, text_len=n - 5)
    cut = text_windows(long, tok, text_len=20, truncate=True)  # shot 1 lost every token
    assert cut.num_tokens == 20 and cut.windows[2].tolist() == [0, 0]


# ----------------------------------------------------------------------------- official cleaning
# LLM-written captions: curly quotes, a ligature, full-width punctuation (ftfy maps all of them).
FANCY = [
    ("The painter’s studio is “quiet”，full of ﬁne light！ [character1] works alone.",
     ["[character1]’s hand lifts the brush（slowly）.", "Close-up： the ﬁnished canvas, “done”."]),
    ("A bright kitchen；the character’s glass is empty.",
     ["The character pours water！", "Wide shot: the glass is “full”.", "A dog runs，a cat sits."]),
    ("A room with “two” doors.", ["The character, looking around：", "The character’s smile."]),
]


def official_prompt(glob, shots):
    """HoloCine's `prepare_multishot_inputs` prompt string (no cleaning of its own)."""
    if "This scene contains" not in glob:
        glob = glob.strip() + f" This scene contains {len(shots)} shots."
    return f"[global caption] {glob} [per shot caption] {' [shot cut] '.join(shots)}"


def official_clean(text):
    """HoloCine's `basic_clean` + `whitespace_clean` (wan_prompter.py), written out."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def umt5_like_dir(tmp_path_factory):
    """A real Unigram tokenizer.json (Metaspace, trailing </s>) trained here, as a HF directory."""
    raw = [official_prompt(g, s) for g, s in FANCY]
    corpus = CORPUS + raw + [official_clean(t) for t in raw]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus * 4, trainers.UnigramTrainer(
        vocab_size=250, special_tokens=SPECIALS, unk_token="<unk>"))
    path = tmp_path_factory.mktemp("umt5_like")
    _with_eos(tok).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=512)))
    return str(path)


def test_token_ids_equal_the_official_prompters_on_llm_punctuation(umt5_like_dir):
    hf = AutoTokenizer.from_pretrained(umt5_like_dir, use_fast=True)
    ours = load_tokenizer(umt5_like_dir)
    for glob, shots in FANCY:
        raw = official_prompt(glob, shots)
        want = hf([official_clean(raw)], padding="max_length", truncation=True, max_length=256,
                  add_special_tokens=True, return_tensors="np")
        for prompt in (raw, build_prompt(glob, shots)):
            ids, mask = tokenize(ours, [prompt], 256)
            np.testing.assert_array_equal(ids[0], want["input_ids"][0], err_msg=prompt)
            np.testing.assert_array_equal(mask[0], want["attention_mask"][0], err_msg=prompt)
        # the raw ’ “ ” ﬁ and full-width forms are pieces of their own: cleaning decides the ids
        assert hf([raw], add_special_tokens=True)["input_ids"] != hf(
            [official_clean(raw)], add_special_tokens=True)["input_ids"]


def test_windows_of_llm_punctuation_follow_the_official_rules(umt5_like_dir):
    hf = AutoTokenizer.from_pretrained(umt5_like_dir, use_fast=True)
    for glob, shots in FANCY:
        raw = official_prompt(glob, shots)
        clean = official_clean(raw)
        offsets = hf(clean, return_offsets_mapping=True)["offset_mapping"]
        tw = text_windows(raw, load_tokenizer(umt5_like_dir), num_shots=len(shots), text_len=256)
        layout = ShotLayout.from_latent_cuts(len(shots), range(1, len(shots)), latent_hw=(1, 1),
                                             max_shots=6, text_windows=tw.windows,
                                             text_pad_start=tw.pad_start)
        # The official prompter finds spans on the raw prompt but tokenises the cleaned one; they
        # agree where cleaning keeps lengths. With `ﬁ` -> `fi` we find spans on the cleaned text.
        spans_on = raw if len(raw) == len(clean) else clean
        np.testing.assert_array_equal(np.asarray(layout.cross_attention_mask(256)),
                                      official_mask(spans_on, offsets, 256), err_msg=raw)
