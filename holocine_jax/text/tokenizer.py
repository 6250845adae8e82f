"""Tokenizers (DESIGN §7, §9): a local fast tokenizer, or the synthetic world's word tokenizer.

    tokenizer = load_tokenizer("/ckpt/umt5-xxl")       # its tokenizer.json; never the network
    tokenizer = world_tokenizer()                     # tiny config: words of the synthetic world
    ids, mask = tokenize(tokenizer, prompts, text_len=512)

Both are `tokenizers.Tokenizer`s with character offsets, so `prompts.text_windows` works on them.
Like Wan's tokenizer call, `tokenize` cleans whitespace, appends the closing special tokens (`</s>`),
truncates to `text_len` keeping them, and pads with the pad token (mask 0).
"""
from __future__ import annotations

import functools
import os

import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

from holocine_jax import prompts
from holocine_jax.world import caption_vocabulary, caption_words

TOKENIZER_FILE = "tokenizer.json"
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # T5 ids 0, 1, 2


def load_tokenizer(path: str) -> Tokenizer:
    """The fast tokenizer in `path` (a `tokenizer.json`, or a directory holding one)."""
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        hint = (" (it has a sentencepiece spiece.model only: write tokenizer.json with transformers' "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
                if os.path.isdir(path) and os.path.exists(os.path.join(path, "spiece.model")) else "")
        raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path!r}{hint}")
    tok = Tokenizer.from_file(file)
    tok.no_padding()      # `tokenize` pads and truncates itself; offsets must be the text's only
    tok.no_truncation()
    return tok


@functools.cache
def world_vocabulary() -> tuple[str, ...]:
    """Special tokens, then every word of the world's captions, the prompt tags and shot counts."""
    frame = prompts.build_prompt("This scene contains shots.", ["x", "y"])
    words = set(caption_vocabulary()) | set(caption_words(frame)) | {str(n) for n in range(100)}
    return (PAD, EOS, UNK) + tuple(sorted(words - {PAD, EOS, UNK}))


def world_tokenizer() -> Tokenizer:
    """Word-level tokenizer of the synthetic world (deterministic): lower-cases, splits words and
    punctuation like `world.caption_words`, unknown words -> `<unk>`, appends `</s>`."""
    vocab = {w: i for i, w in enumerate(world_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"[^\w\s-]"), "isolated")])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    tok.add_special_tokens([PAD, EOS, UNK])
    return tok


def pad_id(tokenizer: Tokenizer) -> int:
    """The id of `<pad>` (0 when the vocabulary has none, as in T5)."""
    found = tokenizer.token_to_id(PAD)
    return 0 if found is None else int(found)


def tokenize(tokenizer: Tokenizer, texts, text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [B, text_len], attention_mask int32 [B, text_len]) of `texts` (cleaned)."""
    if isinstance(texts, str):
        raise TypeError("tokenize takes a list of prompts, not one string")
    texts = [prompts.clean_prompt(t) for t in texts]
    ids = np.full((len(texts), text_len), pad_id(tokenizer), np.int32)
    mask = np.zeros((len(texts), text_len), np.int32)
    for i, enc in enumerate(tokenizer.encode_batch(texts, add_special_tokens=True)):
        row, special = list(enc.ids), enc.special_tokens_mask
        if len(row) > text_len:
            tail = len(special) - len("".join(map(str, special)).rstrip("1"))  # closing specials
            row = row[: text_len - tail] + row[len(row) - tail:]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask
