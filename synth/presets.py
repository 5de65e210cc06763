"""Corpus sizes: one frozen dataclass value per preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Preset:
    name: str
    train_videos: int
    val_videos: int
    test_videos: int
    activities_per_video: tuple[int, int]  # inclusive range; one activity per segment
    objects_per_activity: tuple[int, int]  # inclusive range
    segment_s: int
    # A shorter last clip after the final segment, so that clip windows do not
    # always end on a segment boundary (consumers must clip the last window).
    tail_s: float
    # Training videos also get a summary of every run of consecutive segments (SpanSummary).
    span_summaries: bool = False
    # And this many summaries of their segments told in other orders (ReorderedSummary).
    reordered_summaries: int = 0
    # And this many summaries of segments of several training videos of one place (ComposedSummary).
    composed_summaries: int = 0
    clip_s: int = 4
    fps: int = 8
    width: int = 128
    height: int = 128

    def __post_init__(self) -> None:
        if self.segment_s % self.clip_s:
            raise ValueError(f"segment_s={self.segment_s} is not a multiple of clip_s={self.clip_s}")
        if not 0 <= self.tail_s < self.clip_s or (self.tail_s * self.fps) % 1:
            raise ValueError(f"tail_s={self.tail_s} must be a whole number of frames shorter than a clip")
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even (yuv420p)")
        if min(self.activities_per_video) < 1 or min(self.objects_per_activity) < 1:
            raise ValueError("a video needs at least one activity and an activity at least one object")

    def videos_per_split(self) -> dict[str, int]:
        return {"train": self.train_videos, "val": self.val_videos, "test": self.test_videos}

    def to_dict(self) -> dict:
        return {**asdict(self), "activities_per_video": list(self.activities_per_video),
                "objects_per_activity": list(self.objects_per_activity)}


PRESETS: dict[str, Preset] = {
    # Tests: six videos of about a minute, generated in a couple of seconds.
    "tiny": Preset("tiny", 4, 1, 1, activities_per_video=(2, 3), objects_per_activity=(2, 3),
                   segment_s=24, tail_s=2.0),
    # The demo: enough segments per split to train the segment and video levels on 2 CPU cores in
    # minutes; 64 training videos give 64 summaries, so their runs of segments are summarised too
    # (about 600 more), their segments told in 4 other orders (256 more), and 512 videos composed of
    # segments of several of them; 24 test videos, so that a video-level figure moves in steps of 4%.
    "demo": Preset("demo", 64, 8, 24, activities_per_video=(3, 5), objects_per_activity=(2, 3),
                   segment_s=32, tail_s=2.0, span_summaries=True, reordered_summaries=4, composed_summaries=512),
    # Scale: one hour with the official 180-s segments.
    "hour": Preset("hour", 0, 0, 1, activities_per_video=(20, 20), objects_per_activity=(2, 3),
                   segment_s=180, tail_s=0.0),
    # A 1280x720 benchmark file for decoding throughput.
    "hd": Preset("hd", 0, 0, 1, activities_per_video=(1, 1), objects_per_activity=(3, 3),
                 segment_s=180, tail_s=2.0, fps=30, width=1280, height=720),
}


def resolve(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
