"""What the world's captions can say, and their one set of templates (DESIGN §9).

A shot caption names the framing, the character's shape, the action (and, for the entrance, the
entry side); the action fixes the glass state. Captions never name the colour, pattern or room.

    text = shot_caption("enter", "wide", "circle", "left")
    # 'Wide shot: the circle enters from the left and stops beside an empty glass on a table.'
    caption_facts(text)  # dict(framing="wide", shape="circle", glass="empty", entry_side="left")
"""
from __future__ import annotations

import re

SHAPES = ("circle", "square", "triangle", "diamond")
ENTRY_SIDES = ("left", "right")
FRAMINGS = ("wide", "close-up")
ACTIONS = ("enter", "look", "pour", "rest")
GLASS_STATES = ("empty", "filling", "full")
ACTION_GLASS = {"enter": "empty", "look": "empty", "pour": "filling", "rest": "full"}

FRAMING_WORDS = {"wide": "Wide shot", "close-up": "Close-up"}
ACTION_VERBS = {"enter": "enters", "look": "looks", "pour": "pours", "rest": "stands"}
_HEAD = "{framing}: the {shape} {verb}"
_ENTRY = " from the {side}"
SHOT_TEMPLATES = {
    "enter": _HEAD + _ENTRY + " and stops beside an empty glass on a table.",
    "look": _HEAD + " at the empty glass.",
    "pour": _HEAD + " water into the glass.",
    "rest": _HEAD + " beside the full glass.",
}
GLOBAL_TEMPLATE = "A {shape} walks into a room, fills a glass with water and waits beside it."
WORD = r"[\w-]+|[^\w\s]"  # a caption word: letters/digits/hyphens, or one punctuation mark


def shot_caption(action: str, framing: str, shape: str, side: str) -> str:
    """The caption of a shot (`side` appears only in the entrance)."""
    return SHOT_TEMPLATES[action].format(framing=FRAMING_WORDS[framing], shape=shape,
                                         verb=ACTION_VERBS[action], side=side)


def global_caption(shape: str) -> str:
    """The film's global caption."""
    return GLOBAL_TEMPLATE.format(shape=shape)


def caption_words(text: str) -> list[str]:
    """`text` lower-cased and split into caption words and punctuation marks."""
    return re.findall(WORD, text.lower())


def caption_vocabulary() -> tuple[str, ...]:
    """Every word (lower case, punctuation split off) any caption of the world can use."""
    texts = [global_caption(s) for s in SHAPES]
    texts += [shot_caption(a, f, s, side) for a in ACTIONS for f in FRAMINGS for s in SHAPES
              for side in ENTRY_SIDES]
    return tuple(sorted({w for t in texts for w in caption_words(t)}))


def _either(words) -> str:
    return "(" + "|".join(map(re.escape, words)) + ")"


_CAPTION = re.compile("^" + (_HEAD + f"(?:{_ENTRY})?").format(
    framing=_either(FRAMING_WORDS.values()), shape=r"(\w+)", verb=_either(ACTION_VERBS.values()),
    side=_either(ENTRY_SIDES)))
_FRAMING_OF = {w: f for f, w in FRAMING_WORDS.items()}
_ACTION_OF = {v: a for a, v in ACTION_VERBS.items()}


def caption_facts(caption: str) -> dict:
    """What a shot caption states: framing, shape, glass, entry side (if any); {} for a caption
    that does not start like one of the world's."""
    m = _CAPTION.match(caption)
    if not m:
        return {}
    facts = dict(framing=_FRAMING_OF[m[1]], shape=m[2], glass=ACTION_GLASS[_ACTION_OF[m[3]]])
    if m[4]:
        facts["entry_side"] = m[4]
    return facts
