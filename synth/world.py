"""The event grammar: a session in a place is a sequence of activities; an
activity is a sequence of 4-s actions on its objects."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from synth import captions
from synth.presets import SPLITS, Preset

PLACES = ("kitchen", "workshop", "garden", "studio", "garage")
SHAPES = ("cube", "ball", "cone", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Action:
    verb: str
    thing: Thing  # as it looks when the action starts
    new_colour: str | None = None  # what "paints" turns it into


@dataclass(frozen=True)
class Clip:
    start_s: float
    end_s: float
    action: Action
    caption: str


@dataclass(frozen=True)
class Activity:
    name: str
    # Verbs applied to each object in turn, cycling through the objects until
    # the segment is full; "moves" becomes moves_left or moves_right.
    step: tuple[str, ...]
    same_shape: bool  # sorting: one shape in several colours; otherwise distinct shapes


ACTIVITIES = {a.name: a for a in (
    Activity("sorting", ("picks_up", "moves", "puts_down"), same_shape=True),
    Activity("stacking", ("picks_up", "puts_down"), same_shape=False),
    Activity("painting", ("paints", "turns"), same_shape=False),
    Activity("washing", ("washes", "turns"), same_shape=False),
    Activity("arranging", ("moves", "turns"), same_shape=False),
)}


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float
    activity: str
    clips: tuple[Clip, ...]
    description: str


@dataclass(frozen=True)
class SpanSummary:
    """A summary of a run of consecutive segments of a training video: extra video-level supervision, the
    corpus's counterpart of the pseudo-summaries an LLM writes for Ego4D in the Video ReCap paper."""
    segments: tuple[Segment, ...]
    summary: str

    @property
    def start_s(self) -> float:
        return self.segments[0].start_s

    @property
    def end_s(self) -> float:
        return self.segments[-1].end_s


@dataclass(frozen=True)
class ReorderedSummary:
    """A training video's segments told in another order, summarised as if they had happened so: extra
    video-level supervision that only the segment descriptions explain (the features are read as an unordered
    set), so a recursive model learns to follow its descriptions in order rather than recall a video's story."""
    segments: tuple[Segment, ...]  # in the order told
    summary: str


@dataclass(frozen=True)
class ComposedSummary:
    """Segments of several training videos of one place, told as if one video had them in this order, summarised
    as a video is: extra video-level supervision whose story no video has, so a recursive model can only fit it by
    reading its descriptions in order, not by recalling a training video's story from its features."""
    place: str
    parts: tuple[tuple[str, Segment], ...]  # (video, segment), in the order told
    summary: str

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(g for _, g in self.parts)


@dataclass(frozen=True)
class Session:
    vid: str
    split: str
    place: str
    duration_s: float
    clips: tuple[Clip, ...]  # tiling the whole video, the tail clip included
    segments: tuple[Segment, ...]
    summary: str
    render_seed: int  # nuisance variation (object size, position, bubbles) for the renderer
    span_summaries: tuple[SpanSummary, ...] = ()
    reordered_summaries: tuple[ReorderedSummary, ...] = ()


def plan_corpus(preset: Preset, seed: int) -> list[Session]:
    splits = [split for split in SPLITS for _ in range(preset.videos_per_split()[split])]
    rngs = np.random.default_rng(seed).spawn(len(splits))
    return [plan_session(f"{preset.name}-{seed}-{i:03d}", split, preset, rng)
            for i, (split, rng) in enumerate(zip(splits, rngs))]


def plan_session(vid: str, split: str, preset: Preset, rng: np.random.Generator) -> Session:
    place = str(rng.choice(PLACES))
    n_segments = int(rng.integers(preset.activities_per_video[0], preset.activities_per_video[1] + 1))
    names = _activity_sequence(n_segments, rng)
    clips_per_segment = preset.segment_s // preset.clip_s
    tail_clips = 1 if preset.tail_s else 0
    duration = n_segments * preset.segment_s + preset.tail_s

    clips: list[Clip] = []
    segments: list[Segment] = []
    for j, name in enumerate(names):
        # The tail continues the last activity but belongs to no segment.
        extra = tail_clips if j == n_segments - 1 else 0
        actions = _activity_actions(ACTIVITIES[name], clips_per_segment + extra, preset, rng)
        first = len(clips)
        for action in actions:
            start = float(len(clips) * preset.clip_s)
            clips.append(Clip(start, min(start + preset.clip_s, duration), action,
                              captions.clip_caption(action, rng)))
        inside = tuple(clips[first:first + clips_per_segment])
        description = captions.segment_description(name, [c.action for c in inside], rng)
        segments.append(Segment(float(j * preset.segment_s), float((j + 1) * preset.segment_s),
                                name, inside, description))
    summary = captions.video_summary(place, [(s.activity, [c.action for c in s.clips]) for s in segments], rng)
    render_seed = int(rng.integers(2**31))
    spans = _span_summaries(place, segments, np.random.default_rng([render_seed, 1])) \
        if preset.span_summaries and split == "train" else ()
    reordered = _reordered_summaries(place, segments, preset.reordered_summaries, np.random.default_rng(
        [render_seed, 2])) if preset.reordered_summaries and split == "train" else ()
    return Session(vid, split, place, float(duration), tuple(clips), tuple(segments), summary, render_seed, spans,
                   reordered)


def plan_composed(preset: Preset, seed: int, sessions: list[Session]) -> tuple[ComposedSummary, ...]:
    """`preset.composed_summaries` composed summaries of the training sessions, from a random stream of their own
    (the rest of the corpus is as without them): a place, then as many distinct segments of its training videos as
    a video has activities, never the same activity twice in a row. Fewer where the places lack segments."""
    rng = np.random.default_rng([seed, 3])
    pool: dict[str, list[tuple[str, Segment]]] = {}
    for s in sessions:
        if s.split == "train":
            pool.setdefault(s.place, []).extend((s.vid, g) for g in s.segments)
    places, composed = sorted(pool), []
    for _ in range(8 * preset.composed_summaries if places else 0):  # a few draws more than needed: some fail
        place = places[int(rng.integers(len(places)))]
        n = int(rng.integers(preset.activities_per_video[0], preset.activities_per_video[1] + 1))
        parts: list[tuple[str, Segment]] = []
        for i in rng.permutation(len(pool[place])):
            if len(parts) < n and (not parts or parts[-1][1].activity != pool[place][i][1].activity):
                parts.append(pool[place][i])
        if len(parts) == n:
            summary = captions.video_summary(place, [(g.activity, [c.action for c in g.clips]) for _, g in parts], rng)
            composed.append(ComposedSummary(place, tuple(parts), summary))
        if len(composed) == preset.composed_summaries:
            break
    return tuple(composed)


def _span_summaries(place: str, segments: list[Segment], rng: np.random.Generator) -> tuple[SpanSummary, ...]:
    """Every run of consecutive segments but the whole video, summarised as a video is."""
    n = len(segments)
    runs = [segments[i:j] for i in range(n) for j in range(i + 1, n + 1) if j - i < n]
    return tuple(SpanSummary(tuple(run), captions.video_summary(
        place, [(g.activity, [c.action for c in g.clips]) for g in run], rng)) for run in runs)


def _reordered_summaries(place: str, segments: list[Segment], n: int,
                         rng: np.random.Generator) -> tuple[ReorderedSummary, ...]:
    """Up to n distinct orders of the segments other than the true one (fewer when there are not so many)."""
    orders, identity = [], tuple(range(len(segments)))
    for _ in range(8 * n):  # a few draws more than needed: some repeat
        order = tuple(int(i) for i in rng.permutation(len(segments)))
        if len(orders) < n and order != identity and order not in orders:
            orders.append(order)
    told = [[segments[i] for i in order] for order in orders]
    return tuple(ReorderedSummary(tuple(run), captions.video_summary(
        place, [(g.activity, [c.action for c in g.clips]) for g in run], rng)) for run in told)


def _activity_sequence(n: int, rng: np.random.Generator) -> list[str]:
    """Activities in order, never the same one twice in a row."""
    names = list(ACTIVITIES)
    sequence = [str(rng.choice(names))]
    while len(sequence) < n:
        sequence.append(str(rng.choice([a for a in names if a != sequence[-1]])))
    return sequence


def _activity_actions(activity: Activity, n: int, preset: Preset, rng: np.random.Generator) -> list[Action]:
    things = _objects(activity, int(rng.integers(preset.objects_per_activity[0],
                                                 preset.objects_per_activity[1] + 1)), rng)
    actions = []
    for k in range(n):
        index = (k // len(activity.step)) % len(things)
        thing = things[index]
        verb = activity.step[k % len(activity.step)]
        if verb == "moves":
            verb = str(rng.choice(["moves_left", "moves_right"]))
        if verb == "paints":
            new_colour = str(rng.choice([c for c in COLOURS if c != thing.colour]))
            actions.append(Action(verb, thing, new_colour))
            things[index] = replace(thing, colour=new_colour)
        else:
            actions.append(Action(verb, thing))
    return actions


def _objects(activity: Activity, n: int, rng: np.random.Generator) -> list[Thing]:
    if activity.same_shape:
        shape = str(rng.choice(SHAPES))
        return [Thing(shape, str(c)) for c in rng.choice(COLOURS, size=min(n, len(COLOURS)), replace=False)]
    return [Thing(str(s), str(rng.choice(COLOURS))) for s in rng.choice(SHAPES, size=min(n, len(SHAPES)), replace=False)]
