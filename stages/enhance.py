"""ExCae's captioners (Chen et al. 2025, caption self-improvement) and the stage that applies a prompt to every video.

A captioner writes K captions per unit of a video under a prompt; a unit is a clip window, a segment window or
the whole video, as the prompt's level says:
  LocalCaptioner     our ReCap model of that level (features + lower-level captions, as `recap captions` reads
                     them); its prompt is a decoding `Recipe`
  EndpointCaptioner  an OpenAI-compatible chat endpoint given a few frames of the unit and the prompt text
                     (`ChatPrompt`)
EnhanceStage writes captions/enhanced/<version>/<video_id>.parquet: a row per unit and k, with the prompt's
text and its fields; the version hashes the prompt, the captioner's models and K.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from models.encoders import describe_encoder
from models.generation import generate
from stages.base import Blocked, Resources, Stage, Unit
from stages.captions import CaptionStage
from stages.chat import ChatEndpoint, EndpointError, jpeg_part, parse_lines
from stages.decode import WindowReader, window_times
from stages.examples import ExampleReader, best_window, collate, inside, pad_rows
from store import LEVELS, Store, fingerprint, read_videos

ENHANCE_STAGE = "enhance"
ENHANCED_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("level", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()),
    ("k", pa.int32()), ("text", pa.string()),
    ("prompt", pa.string()),   # the prompt's text (a recipe's canonical string)
    ("recipe", pa.string()),   # the prompt's fields, JSON
    ("fingerprint", pa.string()), ("version", pa.string()),
])


def enhanced_rel(version: str, video_id: str) -> str:
    return f"captions/enhanced/{version}/{video_id}.parquet"


# ---- prompts -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """A prompt for our own models: how to decode K captions per unit.

    No text prefix: `models.generation.generate` starts every caption at BOS and takes no forced tokens (nor a
    key/value cache to continue from), so a prefix would need a decoding loop of our own.
    Beam search returns only its best beam, so its K captions differ only through jitter.
    """

    level: str = "video"
    method: str = "sample"     # greedy | sample (nucleus) | beam
    temperature: float = 1.0   # sample
    top_p: float = 0.9         # sample
    num_beams: int = 4         # beam
    jitter: float = 0.0        # caption k reads its feature windows shifted by jitter * (2k/(K-1) - 1) of their
                               # spacing (clip: of its frames, taken across the neighbouring window)
    returns: int = 10          # K

    SPACE: ClassVar[dict] = {"method": ("greedy", "sample", "beam"), "temperature": (0.5, 0.7, 1.0, 1.3),
                             "top_p": (0.5, 0.7, 0.9, 0.95, 1.0), "num_beams": (2, 4, 8),
                             "jitter": (0.0, 0.1, 0.25, 0.5)}
    READS: ClassVar[dict] = {"greedy": (), "sample": ("temperature", "top_p"), "beam": ("num_beams",)}

    def __post_init__(self):
        ok = {"level": self.level in LEVELS, "method": self.method in self.READS, "temperature": self.temperature > 0,
              "top_p": 0 < self.top_p <= 1, "num_beams": self.num_beams >= 1, "jitter": 0 <= self.jitter < 1,
              "returns": self.returns >= 1}
        bad = [f"{name} = {getattr(self, name)!r}" for name, good in ok.items() if not good]
        if bad:
            raise ValueError(f"recipe: {', '.join(bad)} out of range (level clip|segment|video, method "
                             "greedy|sample|beam, temperature > 0, 0 < top_p <= 1, num_beams >= 1, 0 <= jitter < 1, "
                             "returns >= 1)")

    def mutable(self) -> tuple[str, ...]:
        """The fields a rewrite may change: those this method reads (level and K are the search's)."""
        return ("method", *self.READS.get(self.method, ()), "jitter")

    def normal(self) -> Recipe:
        """The same decoding with the fields its method does not read at their defaults: one text per behaviour."""
        unread = {f.name: f.default for f in fields(self) if f.name in ("temperature", "top_p", "num_beams")
                  and f.name not in self.READS[self.method]}
        return replace(self, **unread)

    def text(self) -> str:
        shown = ("level", "method", *self.READS.get(self.method, ()), "jitter", "returns")
        return " ".join(f"{name}={getattr(self, name)}" for name in shown)

    @classmethod
    def parse(cls, text: str, like: Recipe | None = None) -> Recipe:
        """A recipe from its text (`level=video method=sample temperature=0.7 ...`); fields not given come from
        `like`, and `like`'s level and K always stay. Raises ValueError naming what is wrong."""
        types = {f.name: type(f.default) for f in fields(cls)}
        values = asdict(like) if like else {}
        for word in text.replace(",", " ").split():
            name, sep, value = word.partition("=")
            if not sep or name not in types:
                raise ValueError(f"recipe {text!r}: {word!r} is not name=value of {', '.join(types)}")
            try:
                values[name] = types[name](value)
            except ValueError:
                raise ValueError(f"recipe {text!r}: {name} = {value!r} is not {types[name].__name__}") from None
        if like:
            values |= {"level": like.level, "returns": like.returns}
        return cls(**values).normal()

    def with_field(self, name: str, value) -> Recipe:
        return replace(self, **{name: value}).normal()


INSTRUCTIONS = (  # the local engineer's choices for a chat prompt; the first is ExCae's iteration-0 prompt
    "Generate {k} captions from different perspectives about this video.",
    "Write {k} short captions of this video, each about a different aspect: the actions, the objects and their "
    "colours, the place, the order of events.",
    "Describe this video in {k} sentences: what the person does first, next and last, which objects they handle, "
    "and where.",
    "List {k} different one-sentence descriptions of this video, each naming the objects and their colours.",
    "Give {k} captions of this video as a narrator would, varying the wording and the level of detail.",
)


@dataclass(frozen=True)
class ChatPrompt:
    """A prompt for a chat endpoint: the instruction itself."""

    instruction: str = INSTRUCTIONS[0].format(k=10)
    returns: int = 10  # K

    SPACE: ClassVar[dict] = {"instruction": INSTRUCTIONS}

    def __post_init__(self):
        if not self.instruction.strip() or self.returns < 1:
            raise ValueError(f"chat prompt {self.instruction!r} with K = {self.returns}: needs text and K >= 1")

    def mutable(self) -> tuple[str, ...]:
        return ("instruction",)

    def text(self) -> str:
        return self.instruction

    @classmethod
    def parse(cls, text: str, like: ChatPrompt | None = None) -> ChatPrompt:
        return cls(text.strip(), like.returns if like else cls.returns)

    def with_field(self, name: str, value) -> ChatPrompt:
        return replace(self, **{name: value.format(k=self.returns)})


def prompt_from(fields_: dict):
    """A prompt back from its committed fields."""
    return ChatPrompt(**fields_) if "instruction" in fields_ else Recipe(**fields_)


def jitter_offsets(jitter: float, k: int) -> list[float]:
    """K shifts spread evenly over [-jitter, jitter], in units of the windows' spacing."""
    return [0.0] * k if k == 1 or jitter == 0 else [jitter * (2 * i / (k - 1) - 1) for i in range(k)]


# ---- captioners ----------------------------------------------------------------------------------------------

Captions = list[tuple[float, float, list[str]]]  # per unit: start_s, end_s, its K captions


@dataclass(eq=False)
class LocalCaptioner:
    """Our ReCap model of the recipe's level. `stage` is that level's caption stage: its plan (a video is blocked
    while its features or lower-level captions are missing), its examples and its model."""

    stage: CaptionStage

    prompt_type: ClassVar = Recipe

    @property
    def level(self) -> str:
        return self.stage.level

    def identity(self) -> dict:
        return {"captioner": "local", "stage": self.stage.version()}

    def resources(self) -> Resources:
        return self.stage.resources

    def initial(self, k: int) -> Recipe:
        return Recipe(level=self.level, returns=k)

    def plan(self, store: Store) -> list[Unit | Blocked]:
        return self.stage.plan(store)

    def setup(self) -> None:
        self.stage.setup()

    def check(self) -> None:
        self.stage.check()

    def caption(self, store: Store, unit: Unit, recipe: Recipe, seed: int) -> Captions:
        self.setup()
        model = self.stage.model
        reader = ExampleReader(self.stage.features.feature_set(store), self.level, model.config.num_video_feat)
        base = self.stage.examples(unit, store, reader)
        offsets = jitter_offsets(recipe.jitter, recipe.returns)
        # Greedy and beam give one caption per input: each distinct shift is decoded once.
        variants = sorted(set(offsets)) if recipe.method != "sample" else offsets
        inputs = [ex for o in variants for ex in self.shifted(reader, unit, base, o)]
        generator = torch.Generator(self.stage.device).manual_seed(int(fingerprint(seed, recipe.text(),
                                                                                   unit.video_id), 16) % 2**63)
        texts = []
        for i in range(0, len(inputs), self.stage.batch_size):
            texts += self.decode(inputs[i:i + self.stage.batch_size], recipe, generator)
        n = len(base)
        which = [variants.index(o) if recipe.method != "sample" else j for j, o in enumerate(offsets)]
        return [(ex.start_s, ex.end_s, [texts[v * n + i] for v in which]) for i, ex in enumerate(base)]

    @torch.inference_mode()
    def decode(self, examples, recipe: Recipe, generator) -> list[str]:
        model, tok, device = self.stage.model, self.stage.tokenizer_model, self.stage.device
        batch = {k: v.to(device) for k, v in collate(examples, tok, min(512, model.config.n_positions)).items()}
        context, mask = model.decoder_context(batch["video"], batch.get("video_mask"), batch.get("text_ids"),
                                              batch.get("text_mask"))
        out = generate(model.text_decoder, context, queries_mask=mask, bos_id=tok.bos_id, eos_id=tok.eos_id,
                       max_new_tokens=model.config.max_gen_tokens - 1, method=recipe.method,
                       num_beams=recipe.num_beams, top_p=recipe.top_p, temperature=recipe.temperature,
                       generator=generator, tokenizer=tok)
        return out.texts

    def shifted(self, reader: ExampleReader, unit: Unit, examples, offset: float):
        """The examples with their feature windows shifted by `offset` of their spacing."""
        if offset == 0:
            return examples
        vid, windows = unit.video_id, reader.windows(unit.video_id)
        if self.level == "clip":
            if not reader.features.has_tokens(vid):
                raise ValueError(f"{vid}: window jitter at the clip level shifts stored tokens, and none are stored "
                                 "(features.tokens = false); use jitter = 0 or extract features with tokens")
            frames = describe_encoder(self.stage.features.encoder).num_frames
            rows = [best_window(windows, e.start_s, e.end_s) for e in examples]
            lo, hi = max(min(rows) - 1, 0), min(max(rows) + 2, len(windows))
            tokens = reader.features.read_tokens(vid, slice(lo, hi)).astype(np.float32)
            return [replace(e, video=shift_frames(tokens, r - lo, frames, round(offset * frames)))
                    for e, r in zip(examples, rows)]
        out = []
        for e in examples:
            rows = np.flatnonzero(inside(windows, e.start_s, e.end_s))
            if len(rows) == 0:
                rows = np.array([best_window(windows, e.start_s, e.end_s)])
            n, f = len(rows), reader.num_feat
            if n > f:  # the official picks, (j + 1) n / (f + 1), moved by a share of their spacing
                picks = rows[np.clip(((np.arange(f) + 1 + offset) * n / (f + 1)).astype(int), 0, n - 1)]
            else:  # every window is read: the span moves by whole windows, into its neighbours
                picks = np.clip(rows + round(offset), 0, len(windows) - 1)
            unique, inverse = np.unique(picks, return_inverse=True)
            cls = reader.features.read_cls(vid, unique).astype(np.float32)[inverse]
            video, mask = pad_rows(cls, f)
            out.append(replace(e, video=video, video_mask=mask))
        return out


def shift_frames(tokens: np.ndarray, row: int, frames: int, shift: int) -> np.ndarray:
    """Window `row`'s tokens (first token, then `frames` x patches) with its frames moved `shift` frames later
    (earlier if negative), the frames it lacks taken from the neighbouring window; the first token stays.
    The video's first and last windows have no neighbour on one side: unchanged that way."""
    other = row + (1 if shift > 0 else -1)
    if shift == 0 or not 0 <= other < len(tokens):
        return tokens[row]
    shift = max(-frames, min(frames, shift))
    dim = tokens.shape[-1]
    patches = tokens[:, 1:].reshape(len(tokens), frames, -1, dim)
    pair = np.concatenate([patches[row], patches[other]] if shift > 0 else [patches[other], patches[row]])
    start = shift if shift > 0 else frames + shift
    return np.concatenate([tokens[row, :1], pair[start:start + frames].reshape(-1, dim)])


@dataclass(eq=False)
class EndpointCaptioner:
    """A chat endpoint shown `frames` frames of each unit (the midpoints of equal parts, `size` px square JPEGs)
    and the prompt, asked for K captions, one a line. A failed request fails its video."""

    endpoint: ChatEndpoint
    level: str = "video"
    clip_s: float = 4.0
    segment_s: float = 180.0
    segment_min_tail: float = 0.5
    frames: int = 4
    size: int = 336
    temperature: float = 0.7

    prompt_type: ClassVar = ChatPrompt
    FORMAT: ClassVar[str] = "Answer with {k} lines, one caption per line, and nothing else."

    def identity(self) -> dict:
        return {"captioner": "endpoint", "url": self.endpoint.url, "model": self.endpoint.model,
                "level": self.level, "frames": self.frames, "size": self.size, "temperature": self.temperature,
                "windows": self.spans_params()}

    def spans_params(self) -> dict:
        return {"clip": {"clip_s": self.clip_s}, "video": {},
                "segment": {"segment_s": self.segment_s, "segment_min_tail": self.segment_min_tail}}[self.level]

    def resources(self) -> Resources:
        return Resources(cpus=1.0, memory_gb=1.0)

    def initial(self, k: int) -> ChatPrompt:
        return ChatPrompt(INSTRUCTIONS[0].format(k=k), k)

    def plan(self, store: Store) -> list[Unit | Blocked]:
        return [Unit(v["video_id"], v["video_id"], fingerprint(v["content_id"]), work=1.0,
                     payload={"uri": v["uri"], "duration_s": v["duration_s"]}) for v in read_videos(store)]

    def setup(self) -> None:
        pass

    def check(self) -> None:
        pass

    def spans(self, duration_s: float) -> np.ndarray:
        if self.level == "clip":
            return window_times(duration_s, self.clip_s)
        if self.level == "segment":
            return window_times(duration_s, self.segment_s, self.segment_min_tail)
        return np.array([[0.0, duration_s]])

    def caption(self, store: Store, unit: Unit, prompt: ChatPrompt, seed: int) -> Captions:
        spans = self.spans(unit.payload["duration_s"])
        frames = WindowReader(unit.payload["uri"], self.size, self.frames, spans)
        text = {"type": "text", "text": f"{prompt.text()}\n{self.FORMAT.format(k=prompt.returns)}"}
        out = []
        for i, (start, end) in enumerate(spans.tolist()):
            images = [jpeg_part(f) for f in frames.read(i, i + 1)[0]]
            reply = self.endpoint.complete([text, *images], temperature=self.temperature, seed=seed,
                                           request_id=f"{unit.video_id}@{start:g}")
            captions = parse_lines(reply, prompt.returns)
            if not captions:
                raise EndpointError(f"{unit.video_id}@{start:g}: the reply holds no caption: {reply[:60]!r}")
            out.append((start, end, captions))
        return out


# ---- the stage -----------------------------------------------------------------------------------------------

@dataclass(eq=False)
class EnhanceStage(Stage):
    """K captions per unit of every video under one prompt (CSI's final one). Plain parameters
    (`pipeline.dag.enhance_stage` resolves them from the configuration and the search)."""

    captioner: LocalCaptioner | EndpointCaptioner
    prompt: Recipe | ChatPrompt
    seed: int = 0
    source: dict = field(default_factory=dict)  # where the prompt came from (the search run), for the record
    name = ENHANCE_STAGE
    work_name = "videos"

    def __post_init__(self):
        self.resources = self.captioner.resources()
        self._version = None

    def version(self) -> str:
        if self._version is None:
            params = {"prompt": asdict(self.prompt), "captioner": self.captioner.identity(), "seed": self.seed}
            self._version = f"enhanced-{fingerprint(params, length=8)}"
        return self._version

    @property
    def output_dir(self) -> str:
        return f"captions/enhanced/{self.version()}"

    def plan(self, store: Store) -> list[Unit | Blocked]:
        return [u if isinstance(u, Blocked) else replace(u, fingerprint=fingerprint(self.version(), u.fingerprint))
                for u in self.captioner.plan(store)]

    def check(self) -> None:
        self.captioner.check()

    def setup(self) -> None:
        self.captioner.setup()

    def process(self, unit: Unit, store: Store) -> dict:
        captions = self.captioner.caption(store, unit, self.prompt, self.seed)
        text, recipe = self.prompt.text(), json.dumps(asdict(self.prompt), sort_keys=True)
        rows = [{"video_id": unit.video_id, "level": self.captioner.level, "start_s": start, "end_s": end, "k": k,
                 "text": caption, "prompt": text, "recipe": recipe, "fingerprint": unit.fingerprint,
                 "version": self.version()}
                for start, end, texts in captions for k, caption in enumerate(texts)]
        rel = enhanced_rel(self.version(), unit.video_id)
        tmp = store.stage_table(rel, pa.Table.from_pylist(rows, schema=ENHANCED_SCHEMA))
        stats = {"rows": len(rows), "units": len(captions), **self.source}
        store.commit(self.name, self.version(), unit.id, unit.fingerprint, {rel: tmp}, stats)
        return stats
