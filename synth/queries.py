"""Retrieval queries: held-out paraphrases of the corpus's facts, for `recap evaluate --task retrieval`.

One query per unit of every split: a whole video (its place and ordered activities), a segment (its activity and
objects) and a clip (its action, object and, for paint, the new colour). A query is written from the unit's facts
(`synth.facts`) with templates of its own: a person ("someone", "a person") in the present progressive, or a
noun phrase, with indefinite articles; never the ground truth's "#C C ..." narration, "C <past tense>"
descriptions or "C was in the ..." summaries. tests/test_synth.py checks that the caption grammar parses no
query and that no query holds a multi-word fragment of a caption template.

The choices draw on a random stream of their own, [seed, QUERY_STREAM], so that adding queries left every other
file of a corpus byte for byte as it was.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from synth.captions import _join
from synth.facts import facts_of_clip, facts_of_segment, facts_of_video

if TYPE_CHECKING:
    from synth.world import Session

QUERY_STREAM = 0x51554552  # "QUER": the stream's tag next to the corpus seed

CLIP_QUERIES = {
    "picks_up": ("someone is picking up a {thing}", "a person lifting a {thing} off the surface",
                 "a hand raising a {thing}"),
    "puts_down": ("someone is putting a {thing} down", "a person lowering a {thing} onto the tabletop",
                  "a {thing} being laid down"),
    "moves_left": ("someone is shifting a {thing} leftwards", "a person nudging a {thing} toward the left side",
                   "a {thing} travelling leftwards across the tabletop"),
    "moves_right": ("someone is shifting a {thing} rightwards", "a person nudging a {thing} toward the right side",
                    "a {thing} travelling rightwards across the tabletop"),
    "turns": ("someone is rotating a {thing}", "a person spinning a {thing} in place", "a {thing} being twisted round"),
    "paints": ("someone is painting a {thing} {new_colour}", "a person giving a {thing} a coat of {new_colour}",
               "a {thing} being brushed {new_colour}"),
    "washes": ("someone is washing a {thing}", "a person scrubbing a {thing} under the tap",
               "a {thing} getting a rinse"),
}

# {objects}: "a red cube, a blue ball and a green cone"; {changes} (painting): "a cone ends up red and ...".
SEGMENT_QUERIES = {
    "sorting": ("someone grouping {objects} according to their colours", "a person sorting out {objects}",
                "{objects} getting sorted"),
    "stacking": ("someone building a pile out of {objects}", "a person stacking up {objects}",
                 "{objects} being piled one onto another"),
    "painting": ("someone painting until {changes}", "a person applying paint so that {changes}",
                 "a stretch of painting in which {changes}"),
    "washing": ("someone giving {objects} a wash", "a person scrubbing {objects} clean", "{objects} getting washed"),
    "arranging": ("someone repositioning {objects} across the tabletop", "a person laying out {objects}",
                  "{objects} being shuffled about"),
}

VIDEO_QUERIES = ("a person in a {place} {steps}", "footage from a {place}: {steps}",
                 "someone at work in a {place}, {steps}")
STEP_JOINERS = (" followed by ", "; next, ", " and afterwards ")
STEPS = {
    "sorting": ("sorting", "grouping things by hue"),
    "stacking": ("stacking", "piling things up"),
    "painting": ("painting", "recolouring things"),
    "washing": ("washing", "cleaning things up"),
    "arranging": ("arranging", "tidying things around"),
}


def query_text(level: str, facts: dict, rng: np.random.Generator) -> str:
    """A query sentence stating `facts` (as `synth.facts` writes them) of a unit of `level`."""
    if level == "clip":
        thing = f"{facts['colour']} {facts['shape']}"
        return _pick(CLIP_QUERIES[facts["action"]], rng).format(thing=thing, new_colour=facts["new_colour"])
    if level == "segment":
        objects = _join([f"a {o}" for o in facts["objects"]])
        changes = _join([f"a {o.split()[1]} ends up {o.split()[0]}" for o in facts["objects"]])
        return _pick(SEGMENT_QUERIES[facts["activity"]], rng).format(objects=objects, changes=changes)
    if level == "video":
        steps = _pick(STEP_JOINERS, rng).join(_pick(STEPS[a], rng) for a in facts["activities"])
        return _pick(VIDEO_QUERIES, rng).format(place=facts["place"], steps=steps)
    raise ValueError(f"unknown level {level!r}")


def plan_queries(sessions: list[Session], seed: int) -> list[dict]:
    """Rows (video_id, split, level, start_s, end_s, text, facts JSON): per session its clips, its segments, then
    the whole video (span summaries of training videos get none)."""
    rng = np.random.default_rng([seed, QUERY_STREAM])
    rows = []
    for s in sessions:
        units = [("clip", c.start_s, c.end_s, facts_of_clip(c.action)) for c in s.clips] + \
                [("segment", g.start_s, g.end_s, facts_of_segment(g)) for g in s.segments] + \
                [("video", 0.0, s.duration_s, facts_of_video(s.place, s.segments))]
        for level, start, end, facts in units:
            rows.append({"video_id": s.vid, "split": s.split, "level": level, "start_s": start, "end_s": end,
                         "text": query_text(level, facts, rng), "facts": json.dumps(facts, sort_keys=True)})
    return rows


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]
