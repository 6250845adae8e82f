"""Tokenizers: a Unigram (sentencepiece-style) tokenizer trained here and loaded offline, the
synthetic world's tokenizer, and encode_text's padding against transformers' tokenizer call."""
import socket

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from holocine_jax import prompts, world
from holocine_jax.config import load_config
from holocine_jax.text import encode_text, load_tokenizer, tiny_text_encoder, tokenize, world_tokenizer

SENTENCES = [
    "A red circle walks into a kitchen and fills a glass with water.",
    "Wide shot: the square enters from the left and stops beside an empty glass.",
    "Close-up: the triangle pours water into the glass, then waits beside it.",
    "The blue diamond looks at the full glass on the table in the office.",
]
PROMPT = prompts.build_prompt("A square walks into a room and fills a glass.",
                              ["Wide shot: the square enters from the left.",
                               "Close-up: the square pours water into the glass."])


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory):
    """A sentencepiece-style Unigram tokenizer trained on SENTENCES, saved like transformers."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(SENTENCES * 4, trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = tmp_path_factory.mktemp("unigram")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(str(path))
    return path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_trained_unigram_loads_offline_and_pads_like_transformers(unigram_dir, no_network):
    tok = load_tokenizer(str(unigram_dir))
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(unigram_dir), local_files_only=True)
    texts = [SENTENCES[0], SENTENCES[2] + " " + SENTENCES[3], "water"]
    for text_len in (64, 12):  # 12: the long prompts are truncated, keeping `</s>`
        ids, mask = tokenize(tok, texts, text_len)
        want = ref(texts, padding="max_length", truncation=True, max_length=text_len)
        np.testing.assert_array_equal(ids, want["input_ids"])
        np.testing.assert_array_equal(mask, want["attention_mask"])
    assert (ids[:, -1] == tok.token_to_id("</s>")).sum() == 2


def test_text_windows_with_loaded_tokenizer(unigram_dir, no_network):
    tok = load_tokenizer(str(unigram_dir))
    windows = prompts.text_windows(PROMPT, tok, num_shots=2, text_len=512)
    offsets = tok.encode(PROMPT).offsets
    for shot, caption in enumerate(prompts.parse_prompt(PROMPT)[1]):
        start = PROMPT.index(caption)
        first, end = windows.windows[shot + 1]
        covered = {c for a, b in offsets[first:end] for c in range(a, b)}
        assert set(range(start, start + len(caption))) <= covered, f"shot {shot}"
    assert windows.num_tokens == len(offsets)


def test_missing_tokenizer_is_named(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*spiece.model"):
        load_tokenizer(str(tmp_path))


def test_world_tokenizer_knows_every_caption_word():
    tok = world_tokenizer()
    assert tok.to_str() == world_tokenizer().to_str()  # deterministic
    unk = tok.token_to_id("<unk>")
    for seed in range(20):
        spec = world.sample_film(seed)
        prompt = prompts.build_prompt(spec.global_caption, spec.shot_captions)
        enc = tok.encode(prompt)
        assert unk not in enc.ids, [t for t in enc.tokens if t == "<unk>"]
        assert enc.ids[-1] == tok.token_to_id("</s>")
        windows = prompts.text_windows(prompt, tok, num_shots=spec.num_shots, text_len=128)
        assert windows.pad_start == len(enc.ids)


def test_encode_text_with_the_tiny_stack():
    config = load_config("tiny", [])
    encoder, tok = tiny_text_encoder(config), world_tokenizer()
    states, ids, mask = encode_text(encoder, tok, [PROMPT, "a glass"], text_len=config.model.text_len)
    assert states.shape == (2, config.model.text_len, config.model.text_dim)
    assert mask.sum(1).tolist() == [len(tok.encode(PROMPT).ids), 3]
    states = np.asarray(states)
    assert not states[mask == 0].any() and np.abs(states[mask == 1]).min(axis=-1).max() > 0
    again = tiny_text_encoder(config)(ids[1:], mask[1:])  # seeded: rebuilt, same weights
    np.testing.assert_allclose(np.asarray(again)[0], states[1], atol=1e-5)
