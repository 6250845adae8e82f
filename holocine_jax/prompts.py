"""The HoloCine prompt format and its text windows (DESIGN §3, §7).

Format: `[global caption] <global> This scene contains K shots. [per shot caption] <shot 1>
[shot cut] <shot 2> [shot cut] ... <shot K>`.

Text windows follow the official rules, named below:
- CHARACTER SPANS: the global span runs from `[global caption]` to `[per shot caption]`; shot 0's
  from `[per shot caption]` through the end of the first `[shot cut]`; shot k's from the end of
  the previous `[shot cut]` through the end of the next; the last shot's to the end of the prompt.
- TOKEN ASSIGNMENT: a token with a non-empty character offset belongs to the first span (in the
  order global, shot 0, shot 1, ...) its characters overlap; special tokens (empty offsets, e.g.
  `</s>`) belong to none. A window is [first, last + 1) of its tokens.
- ONE PAST THE END: the official mask includes one more token, so the window a video token
  sees is [first, last + 2) (`ONE_PAST_END`); windows may thus overlap by a token.
- PADDING: every token from max(window end) + 1 on is visible to all video tokens
  (`text_pad_start`, with the official end = last + 1 of the latest window).

Text is cleaned as the official prompter does (`clean_prompt`: `ftfy.fix_text`, HTML unescaped,
whitespace runs collapsed) before span finding and tokenisation. Where we differ on purpose: the
official prompter finds the spans on the raw prompt but tokenises the cleaned one, so its windows
drift by the characters cleaning removed or added before a tag (`ﬁ` -> `fi`, doubled spaces);
we find them on the cleaned text. The two agree whenever cleaning keeps lengths (curly quotes,
full-width punctuation, prompts from `build_prompt`).
"""
from __future__ import annotations

import dataclasses
import html
import re

import ftfy
import numpy as np

GLOBAL_TAG = "[global caption]"
PER_SHOT_TAG = "[per shot caption]"
CUT_TAG = "[shot cut]"
TEXT_LEN = 512
ONE_PAST_END = 1
_SCENE_RE = re.compile(r"\s*This scene contains \d+ shots\.\s*$")


def clean_prompt(text: str) -> str:
    """The official prompter's cleaning: `ftfy.fix_text` (curly quotes, ligatures, full-width
    forms, mojibake), HTML unescaped twice, whitespace runs collapsed to one space, stripped."""
    # `re`'s \s differs from the official `regex`'s only on U+001C..U+001F, which ftfy removes.
    return re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text)))).strip()


def build_prompt(global_caption: str, shot_captions) -> str:
    """The HoloCine prompt for a global caption and one caption per shot (cleaned)."""
    shot_captions = [clean_prompt(c) for c in shot_captions]
    glob = clean_prompt(global_caption)
    if not glob:
        raise ValueError("the global caption is empty")
    if not shot_captions:
        raise ValueError("a HoloCine prompt needs at least one shot caption")
    for i, c in enumerate(shot_captions):
        if not c:
            raise ValueError(f"the caption of shot {i} is empty")
        for tag in (GLOBAL_TAG, PER_SHOT_TAG, CUT_TAG):
            if tag in c or tag in glob:
                raise ValueError(f"captions may not contain the tag {tag!r}")
    if "This scene contains" not in glob:
        glob = f"{glob} This scene contains {len(shot_captions)} shots."
    return f"{GLOBAL_TAG} {glob} {PER_SHOT_TAG} {f' {CUT_TAG} '.join(shot_captions)}"


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """(global caption, shot captions) of a HoloCine prompt; the inverse of `build_prompt`.

    The "This scene contains K shots." sentence that `build_prompt` appends is removed again.
    """
    text = clean_prompt(prompt)
    if not text.startswith(GLOBAL_TAG) or text.count(PER_SHOT_TAG) != 1:
        raise ValueError(f"not a HoloCine prompt (expected '{GLOBAL_TAG} ... {PER_SHOT_TAG} "
                         f"...'): {text[:80]!r}")
    glob, shots = text[len(GLOBAL_TAG):].split(PER_SHOT_TAG)
    captions = [c.strip() for c in shots.split(CUT_TAG)]
    glob = _SCENE_RE.sub("", glob.strip()).strip()
    return glob, captions


CHARACTER_TAG = re.compile(r"\[character\s*(\d+)\]", re.IGNORECASE)


def character_tags(caption: str) -> set[str]:
    """The character tags a caption names, e.g. "[character1] waves" -> {"character1"}."""
    return {f"character{n}" for n in CHARACTER_TAG.findall(caption)}


def check_character_tags(caption: str) -> None:
    """Raise ValueError naming a bracketed word that looks like a character tag but is not one
    (`[charcter1]`, `[character]`, `[character1` unclosed); other brackets are left alone."""
    for m in re.finditer(r"\[([^\[\]]*)(\]?)", caption):
        inner, closed = m.group(1), m.group(2)
        if re.match(r"\s*(char|chr|charac)", inner, re.IGNORECASE) and (
                not closed or not re.fullmatch(r"character\s*\d+", inner.strip(), re.IGNORECASE)):
            raise ValueError(f"malformed character tag {m.group(0)!r} (tags are [character1], "
                             f"[character2], ...)")


def tagged_shot_pairs(captions) -> list[tuple[int, int]]:
    """Shot pairs (k < l) whose captions share a character tag, as the paper groups shots for
    inter-shot consistency; every pair when no caption has a tag."""
    tags = [character_tags(c) for c in captions]
    pairs = [(k, l) for k in range(len(tags)) for l in range(k + 1, len(tags))]
    return [(k, l) for k, l in pairs if tags[k] & tags[l]] if any(tags) else pairs


def char_spans(prompt: str) -> list[tuple[int, int]]:
    """CHARACTER SPANS of the official rules: [(start, end)] for global, shot 0, shot 1, ...

    Character offsets into `prompt` (already cleaned). A plain prompt (no tags) has no spans.
    """
    g = prompt.find(GLOBAL_TAG)
    p = prompt.find(PER_SHOT_TAG)
    if g < 0:
        return []
    spans = [(g, p if p >= 0 else len(prompt))]
    if p >= 0:
        start = p
        for m in re.finditer(re.escape(CUT_TAG), prompt):
            spans.append((start, m.end()))
            start = m.end()
        if start < len(prompt):
            spans.append((start, len(prompt)))
    return spans


@dataclasses.dataclass(frozen=True)
class TextWindows:
    """Token windows of one prompt: what `ShotLayout.from_*(text_windows=, text_pad_start=)` take.

    windows: [num_shots+1, 2] half-open, one-past-the-end included (row 0 global);
    pad_start: first token every video token sees; num_tokens: real tokens (specials included).
    """
    windows: np.ndarray
    pad_start: int
    num_tokens: int


def token_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character offsets of each token (special tokens included) for a `tokenizers.Tokenizer`
    or a transformers fast tokenizer."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return [tuple(o) for o in tokenizer.encode(text, add_special_tokens=True).offsets]
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    return [tuple(o) for o in enc["offset_mapping"]]


def text_windows(prompt: str, tokenizer, *, num_shots=None, text_len=TEXT_LEN,
                 truncate=False) -> TextWindows:
    """Text windows of a HoloCine prompt under the official rules (module docstring).

    A prompt longer than `text_len` tokens is refused (the original silently truncates) unless
    `truncate=True`: then tokens past `text_len` are dropped and shots left without tokens get
    empty windows. `num_shots` (e.g. the layout's) is checked against the prompt's shot count.
    """
    text = clean_prompt(prompt)
    spans = char_spans(text)
    if len(spans) < 2:
        raise ValueError("the prompt has no '[global caption] ... [per shot caption] ...' "
                         "structure; a prompt without windows needs no text windows")
    _, captions = parse_prompt(text)
    for i, caption in enumerate(captions):
        if not caption:
            raise ValueError(f"the caption of shot {i} is empty")
    shots = len(spans) - 1
    if num_shots is not None and num_shots != shots:
        raise ValueError(f"the prompt has {shots} shot captions but the layout {num_shots} shots")
    offsets = token_offsets(tokenizer, text)
    owner = _assign_tokens(offsets, spans)
    if len(offsets) > text_len:
        over = len(offsets) - text_len
        if not truncate:
            # first caption token lost (from text_len - 1: truncation keeps the `</s>`)
            cut = next((o for o in owner[text_len - 1:] if o >= -1), -2)
            where = {-2: "no caption", -1: "the global caption"}.get(cut, f"shot {cut}'s caption")
            raise ValueError(f"the prompt has {len(offsets)} tokens, {over} more than "
                             f"text_len={text_len}: truncation would cut {where}")
        owner = owner[:text_len]
    windows = np.zeros((shots + 1, 2), np.int64)
    for span_id in range(-1, shots):
        idx = np.flatnonzero(np.asarray(owner) == span_id)
        if idx.size:
            windows[span_id + 1] = idx.min(), idx.max() + 1
        elif not truncate:
            name = "the global caption" if span_id < 0 else f"shot {span_id}'s caption"
            raise ValueError(f"{name} has no tokens (empty caption?)")
    pad_start = int(windows[:, 1].max()) + 1  # PADDING: official end of the latest window, + 1
    windows[:, 1] += ONE_PAST_END * (windows[:, 1] > windows[:, 0])
    return TextWindows(windows.astype(np.int32), pad_start, min(len(offsets), text_len))


def _assign_tokens(offsets, spans) -> list[int]:
    """TOKEN ASSIGNMENT: span id per token (-1 global, k shot k, -2 none)."""
    owner = []
    for a, b in offsets:
        sid = -2
        if a != b:
            for i, (s, e) in enumerate(spans):
                if not (b <= s or a >= e):
                    sid = i - 1
                    break
        owner.append(sid)
    return owner
