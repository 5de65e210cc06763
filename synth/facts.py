"""The facts behind a caption, and a parser of the corpus grammar that maps any text back to them.

    clip     {"action": "paints", "shape": "cone", "colour": "red", "new_colour": "blue"}
    segment  {"activity": "sorting", "objects": ["red cube", "blue cube"]}
    video    {"place": "kitchen", "activities": ["sorting", "painting", "washing"]}

`facts_of_*` give the facts of what the corpus planned; `parse(level, text)` reads them back from
text, or None when the text is not a sentence of the grammar (a prediction that cannot be parsed is
wrong on every fact). Segment objects are what a description names: "colour shape", the colour being
the painted one in painting segments. Parsing ground truth gives its planned facts exactly
(tests/test_synth.py checks every caption of a corpus).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

from synth.captions import CLIP_TEMPLATES, SEGMENT_TEMPLATES, SUMMARY_PHRASES, fields
from synth.world import COLOURS, PLACES, SHAPES

if TYPE_CHECKING:
    from synth.world import Action, Segment

_COLOUR = "(?:" + "|".join(COLOURS) + ")"
_SHAPE = "(?:" + "|".join(SHAPES) + ")"
_THING = f"{_COLOUR} {_SHAPE}"


def _list(item: str) -> str:
    """'a', 'a and b', 'a, b and c': the grammar's joined lists."""
    return f"(?:{item}(?:, {item})* and {item}|{item})"


def _split_list(text: str) -> list[str]:
    head, _, last = text.rpartition(" and ")
    return [*head.split(", "), last] if head else [last]


# What each template field matches, as a named group.
_FIELDS = {
    "thing": f"(?P<thing>{_THING})",
    "colour": f"(?P<colour>{_COLOUR})",
    "things": f"(?P<things>{_list('the ' + _THING)})",
    "colours": f"(?P<colours>{_list(_COLOUR)})",
    "shape": f"(?P<shape>{_SHAPE})",
    "shapes": f"(?P<shapes>{_list('the ' + _SHAPE)})",
    "painted": f"(?P<painted>{_list('the ' + _SHAPE + ' ' + _COLOUR)})",
}


def _pattern(template: str) -> str:
    parts = re.split(r"\{(\w+)\}", template)
    return "".join(re.escape(p) if i % 2 == 0 else _FIELDS[p] for i, p in enumerate(parts))


@lru_cache(maxsize=None)
def _compiled(templates: tuple[tuple[str, str], ...]) -> list[tuple[str, re.Pattern]]:
    return [(key, re.compile(_pattern(t), re.IGNORECASE)) for key, t in templates]


def _match(templates: dict[str, tuple[str, ...]], text: str) -> tuple[str, dict] | None:
    pairs = tuple((key, t) for key, ts in templates.items() for t in ts)
    for key, pattern in _compiled(pairs):
        m = pattern.fullmatch(text)
        if m:
            return key, {k: v.lower() for k, v in m.groupdict().items()}
    return None


def _painted(phrase: str) -> str:
    """'the cone red' -> 'red cone'."""
    shape, colour = phrase.removeprefix("the ").split()
    return f"{colour} {shape}"


def _normalise(text: str | None) -> str:
    return " ".join((text or "").split())


# ---- facts of the plan ------------------------------------------------------------

def facts_of_clip(action: Action) -> dict:
    return {"action": action.verb, "shape": action.thing.shape, "colour": action.thing.colour,
            "new_colour": action.new_colour}


def facts_of_segment(segment: Segment) -> dict:
    f = fields([c.action for c in segment.clips])
    if segment.activity == "painting":
        objects = [_painted(p) for p in _split_list(f["painted"])]
    else:
        objects = [t.removeprefix("the ") for t in _split_list(f["things"])]
    return {"activity": segment.activity, "objects": objects}


def facts_of_video(place: str, segments: Sequence[Segment]) -> dict:
    """Of a whole session's summary, or of a run of its segments (SpanSummary)."""
    return {"place": place, "activities": [s.activity for s in segments]}


# ---- the parser -------------------------------------------------------------------

def parse(level: str, text: str | None) -> dict | None:
    """The facts a caption of `level` states, or None if it is not a sentence of the corpus grammar."""
    text = _normalise(text)
    if level == "clip":
        return _parse_clip(text)
    if level == "segment":
        return _parse_segment(text)
    if level == "video":
        return _parse_video(text)
    raise ValueError(f"unknown level {level!r}")


def _parse_clip(text: str) -> dict | None:
    found = _match(CLIP_TEMPLATES, text)
    if found is None:
        return None
    verb, g = found
    colour, shape = g["thing"].split()
    return {"action": verb, "shape": shape, "colour": colour, "new_colour": g.get("colour")}


def _parse_segment(text: str) -> dict | None:
    found = _match(SEGMENT_TEMPLATES, text)
    if found is None:
        return None
    activity, g = found
    if activity == "painting":
        objects = [_painted(p) for p in _split_list(g["painted"])]
    elif "colours" in g:
        objects = [f"{c} {g['shape']}" for c in _split_list(g["colours"])]
    else:
        objects = [t.removeprefix("the ") for t in _split_list(g["things"])]
    return {"activity": activity, "objects": objects}


_PHRASES = {name: (phrase,) for name, phrase in SUMMARY_PHRASES.items()}
_PLACE = "(?P<place>" + "|".join(PLACES) + ")"
_SUMMARY_STYLES = [re.compile(p, re.IGNORECASE) for p in (
    rf"C was in the {_PLACE}\. C (?P<body>.+)\.",
    rf"In the {_PLACE}, C (?:first )?(?P<body>.+)\.",
    rf"C spent the session in the {_PLACE}\. (?P<body>.+)\.",
)]
_SEPARATORS = re.compile(r", then |, and finally |\. (?:Then|Finally,) C |^(?:First, )?C ", re.IGNORECASE)


def _parse_video(text: str) -> dict | None:
    for pattern in _SUMMARY_STYLES:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        phrases = [p for p in _SEPARATORS.split(m["body"]) if p]
        found = [_match(_PHRASES, phrase) for phrase in phrases]
        if None in found:
            return None
        return {"place": m["place"].lower(), "activities": [activity for activity, _ in found]}
    return None
