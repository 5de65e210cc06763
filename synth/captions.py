"""Paraphrased text for the three levels: Ego4D-style clip narrations, segment
descriptions that follow from a segment's narrations, and a session summary
that follows from the segment descriptions (plus the place, seen in pixels)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from synth.world import Action

CLIP_TEMPLATES = {
    "picks_up": ("#C C picks up the {thing}", "#C C lifts the {thing}", "#C C grabs the {thing}"),
    "puts_down": ("#C C puts down the {thing}", "#C C places the {thing} on the table",
                  "#C C sets down the {thing}"),
    "moves_left": ("#C C moves the {thing} to the left", "#C C slides the {thing} to the left",
                   "#C C pushes the {thing} left"),
    "moves_right": ("#C C moves the {thing} to the right", "#C C slides the {thing} to the right",
                    "#C C pushes the {thing} right"),
    "turns": ("#C C turns the {thing}", "#C C rotates the {thing}", "#C C turns the {thing} around"),
    "paints": ("#C C paints the {thing} {colour}", "#C C colours the {thing} {colour}",
               "#C C paints the {thing} with {colour} paint"),
    "washes": ("#C C washes the {thing}", "#C C rinses the {thing}", "#C C cleans the {thing} with water"),
}

SEGMENT_TEMPLATES = {
    "sorting": ("C sorted the {colours} {shape}s.", "C sorted {things} by colour.",
                "C organised the {colours} {shape}s by colour."),
    "stacking": ("C stacked {things}.", "C piled up {things}.", "C stacked {things} on the table."),
    "painting": ("C painted {painted}.", "C coloured {painted} with a brush.", "C repainted {painted}."),
    "washing": ("C washed {things}.", "C cleaned {things} with water.", "C rinsed {things} in water."),
    "arranging": ("C arranged {things} on the table.", "C moved {things} around the table.",
                  "C rearranged {things}."),
}

# The summary names each activity by one fixed past-tense verb, in order.
SUMMARY_PHRASES = {
    "sorting": "sorted the {shape}s",
    "stacking": "stacked {shapes}",
    "painting": "painted {painted}",
    "washing": "washed {shapes}",
    "arranging": "arranged {shapes}",
}


def clip_caption(action: Action, rng: np.random.Generator) -> str:
    return _pick(CLIP_TEMPLATES[action.verb], rng).format(thing=action.thing, colour=action.new_colour)


def segment_description(activity: str, actions: list[Action], rng: np.random.Generator) -> str:
    return _pick(SEGMENT_TEMPLATES[activity], rng).format(**fields(actions))


def video_summary(place: str, activities: list[tuple[str, list[Action]]], rng: np.random.Generator) -> str:
    phrases = [SUMMARY_PHRASES[name].format(**fields(actions)) for name, actions in activities]
    style = int(rng.integers(3))
    if style == 0:
        return f"C was in the {place}. C " + ", then ".join(phrases) + "."
    if style == 1:
        if len(phrases) == 1:
            return f"In the {place}, C {phrases[0]}."
        return f"In the {place}, C first " + ", then ".join(phrases[:-1]) + f", and finally {phrases[-1]}."
    openers = ["First, C", *["Then C"] * (len(phrases) - 2), "Finally, C"] if len(phrases) > 1 else ["C"]
    return f"C spent the session in the {place}. " + " ".join(f"{o} {p}." for o, p in zip(openers, phrases))


def fields(actions: list[Action]) -> dict[str, str]:
    """What a segment's narrations say: its objects (as first seen) and the
    final colour of each painted one. Paint changes colours, so where there is
    paint, objects are told apart by shape (painting uses distinct shapes)."""
    has_paint = any(a.new_colour for a in actions)
    first_seen, painted = {}, {}
    for a in actions:
        first_seen.setdefault(a.thing.shape if has_paint else a.thing, a.thing)
        if a.new_colour:
            painted[a.thing.shape] = a.new_colour
    things = list(first_seen.values())
    return {
        "things": _join([f"the {t}" for t in things]),
        "colours": _join([t.colour for t in things]),
        "shape": things[0].shape,
        "shapes": _join([f"the {s}" for s in dict.fromkeys(t.shape for t in things)]),
        "painted": _join([f"the {shape} {colour}" for shape, colour in painted.items()]),
    }


def _join(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def _pick(templates: tuple[str, ...], rng: np.random.Generator) -> str:
    return templates[int(rng.integers(len(templates)))]
