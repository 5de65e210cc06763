"""Decoding clip windows: which frames to read, and reading them cheaply.

Windows are [4k, 4k+4) from t = 0, the last one clipped to the duration; a
video shorter than one window still gets one. Each window samples its frames
at the midpoints of equal parts, mapped to frames through the stream's real
timestamps (so variable frame rate is handled). Frames are scaled by the
decoder itself to a short side of `size`, then centre-cropped. decord applies
a stream's display rotation (phone videos) itself and takes the output size in
display orientation, so rotated videos come out upright.
"""

from __future__ import annotations

import math
import os

import decord
import numpy as np


def quiet_decoders() -> None:
    """decord's and FFmpeg's own log lines would interleave with ours: their errors reach us as exceptions."""
    import av

    decord.logging.set_level(decord.logging.QUIET)
    av.logging.set_level(av.logging.PANIC)


def window_times(duration_s: float, clip_s: float = 4.0, min_tail: float = 0.0) -> np.ndarray:
    """[n, 2] start/end seconds of the windows covering a video; a last window shorter than
    `min_tail` x `clip_s` joins the one before (when there is one)."""
    n = max(1, math.ceil(duration_s / clip_s - 1e-9))
    starts = np.arange(n, dtype=np.float64) * clip_s
    windows = np.stack([starts, np.minimum(starts + clip_s, duration_s)], axis=1)
    if n > 1 and windows[-1, 1] - windows[-1, 0] < min_tail * clip_s - 1e-9:
        windows = windows[:-1]
        windows[-1, 1] = duration_s
    return windows


def sample_times(windows: np.ndarray, frames: int) -> np.ndarray:
    """[n, frames] times at the midpoints of `frames` equal parts of each window."""
    parts = (np.arange(frames) + 0.5) / frames
    return windows[:, :1] + (windows[:, 1:] - windows[:, :1]) * parts


def frame_indices(times: np.ndarray, frame_starts: np.ndarray) -> np.ndarray:
    """Index of the frame shown at each time: the last frame starting at or before it."""
    idx = np.searchsorted(frame_starts, times, side="right") - 1
    return np.clip(idx, 0, len(frame_starts) - 1)


class WindowReader:
    """Reads the frames of clip windows from one video, in order, scaled on decode."""

    def __init__(self, path: str, size: int, frames_per_window: int, windows: np.ndarray, threads: int = 1):
        self.path, self.size, self.windows = path, size, windows
        quiet_decoders()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: file not found")
        try:
            probe = decord.VideoReader(path, num_threads=1)
            height, width = probe[0].shape[:2]
        except Exception as e:  # decord reports open failures as bare RuntimeError / DECORDError
            raise ValueError(f"{path}: not a readable video ({type(e).__name__})") from None
        self.num_frames = len(probe)
        del probe
        scale = size / min(height, width)
        # Rounded up so the short side is never below `size` before cropping.
        self.reader = _scaled_reader(path, max(size, math.ceil(width * scale - 1e-6)),
                                     max(size, math.ceil(height * scale - 1e-6)), threads)
        starts = self.reader.get_frame_timestamp(np.arange(self.num_frames))[:, 0]
        self.indices = frame_indices(sample_times(windows, frames_per_window), starts)
        self._keys = np.asarray(self.reader.get_key_indices(), dtype=np.int64)
        self._pos: int | None = None  # index of the frame the reader decodes next, when known

    def read(self, start: int, stop: int) -> np.ndarray:
        """uint8 [stop - start, frames, size, size, 3] for windows [start, stop)."""
        wanted = self.indices[start:stop]
        unique, inverse = np.unique(wanted, return_inverse=True)  # sorted: decoded in stream order
        frames = center_crop(np.stack([self._frame(int(i)) for i in unique]), self.size)
        return np.ascontiguousarray(frames[inverse.reshape(wanted.shape)])

    def _frame(self, i: int) -> np.ndarray:
        """Frame i, decoding forward from the last one read when it is at most one keyframe ahead.

        decord's `get_batch` seeks (rewind to frame 0, seek to the keyframe, decode it to check
        the landing) every time the next index is past a keyframe: clip windows cross one every
        few seconds, and on the 128x128 hour video those seeks made reading take 1.8-3.6x the CPU
        time of decoding straight on (bench/features.py), more under load. Decoding on gives the
        same frames; a backward or longer jump still seeks the way `get_batch` does."""
        keys, pos = self._keys, self._pos
        self._pos = None  # unknown until frame i is read: a failed call leaves the next read to seek
        if pos is None or i < pos or np.searchsorted(keys, i, "right") - np.searchsorted(keys, pos, "right") > 1:
            self.reader.seek_accurate(i)  # what get_batch does for an index it cannot reach by skipping
        elif i > pos:
            key = keys[np.searchsorted(keys, i, "right") - 1]
            if key > pos:  # cross the keyframe by decoding up to it: skip_frames would seek to it
                if key - 1 > pos:
                    self.reader.skip_frames(int(key - 1 - pos))
                self.reader.next()
                pos = int(key)
            if i > pos:
                self.reader.skip_frames(i - pos)  # within one keyframe interval: decodes, no seek
        try:
            frame = self.reader.next().asnumpy()
        except StopIteration:  # get_batch fails the same way, as a DECORDError
            raise decord.DECORDError(f"Error getting frame at: {i} with total frames: {self.num_frames}") from None
        self._pos = i + 1
        return frame


def _scaled_reader(path: str, width: int, height: int, threads: int) -> decord.VideoReader:
    """A reader that scales on decode. decord rejects a few output sizes (48x32 from any
    source, for one); a pixel wider is then tried, which the centre crop absorbs."""
    for extra in range(4):
        reader = decord.VideoReader(path, width=width + extra, height=height, num_threads=threads)
        try:
            reader.get_batch([0])
            reader.seek(0)
            return reader
        except decord.DECORDError:
            continue
    raise ValueError(f"{path}: decoder cannot scale to about {width}x{height}")


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre crop of [..., H, W, C] frames to size x size."""
    h, w = frames.shape[-3:-1]
    top, left = (h - size) // 2, (w - size) // 2
    return frames[..., top:top + size, left:left + size, :]
