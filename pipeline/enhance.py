"""`recap enhance`: CSI, ExCae's caption self-improvement (Chen et al. 2025, Alg. 1); the prompt it ends with is then
applied to every video by `stages.enhance.EnhanceStage`, on Ray like every stage.

The search scores a prompt on a seeded sample of train videos against their ground truth at the prompt's level (per
unit, the ground-truth caption overlapping it most). With ψ the index's dual encoder text tower, a unit's captions
c_1..c_K and its ground truth g:
    similarity = mean over units of mean_k cos(ψ(c_k), ψ(g))
    diversity  = mean over units of 1 - mean_{p != q} cos(ψ(c_p), ψ(c_q))      (0 when K = 1)
    score      = similarity + enhance.diversity_weight * diversity
Iteration 0 scores the captioner's initial prompt; each later one has the engineer rewrite the best prompt. A prompt
whose score beats the pool's best (the pool's maximum) enters the pool and becomes the best. The search stops after
`patience` rewrites in a row that do not, or after `iterations` rewrites.

Each iteration is committed once scored: enhance/search/<run>/iter-NNNN.json, one atomic write, holding the prompt
and its fields, similarity, diversity, score, acceptance, the best after it, a few captions and the failed units.
The run name hashes what decides the scores (captioner, engineer, ψ, level, K, weight, seed, the sampled units and
their ground truth), not `iterations` or `patience`: a longer search continues a shorter one, and a shorter one
replays the records it needs. Randomness comes from (seed, iteration) and (seed, prompt, video), never from what ran
before in the process, so a search killed midway continues after its last committed iteration and ends with the
prompt an uninterrupted one ends with.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.config import Config
from stages.base import Blocked, Unit
from stages.chat import ChatEndpoint
from stages.enhance import ChatPrompt, Recipe, prompt_from
from store import Store, fingerprint, read_groundtruth

SEARCHES = "enhance/search"
SAMPLES = 3  # units whose captions a record keeps (the endpoint engineer's examples)


@dataclass
class SearchResult:
    run_dir: str
    prompt: Recipe | ChatPrompt    # the best prompt when the search stopped
    score: float
    best_iteration: int
    iterations: int                # committed iterations the result rests on
    stopped: str                   # patience | iterations
    wall_s: float


# ---- engineers -------------------------------------------------------------------------------------------------

@dataclass
class LocalEngineer:
    """A seeded local search: one field of the best prompt, drawn among those it reads, gets another value of its
    space; up to `tries` draws for a prompt not tried yet."""

    seed: int = 0
    tries: int = 50

    def identity(self) -> dict:
        return {"engineer": "local"}

    def rewrite(self, best, record: dict, history: list[dict], iteration: int):
        rng = random.Random(f"{self.seed}:{iteration}")
        tried = {r["prompt"] for r in history}
        candidate = best
        for _ in range(self.tries):
            name = rng.choice(best.mutable())
            candidate = best.with_field(name, rng.choice([v for v in best.SPACE[name] if v != getattr(best, name)]))
            if candidate.text() not in tried:
                break
        return candidate


REWRITE = """You improve the prompt of a video captioner. It writes {k} captions per video under the prompt; a prompt \
scores higher when its captions match the video's reference description and differ from one another.

The best prompt so far (score {score:.4f}: similarity {similarity:.4f}, diversity {diversity:.4f}):
{prompt}

Reference descriptions of a few videos:
{references}

Captions the best prompt wrote for them:
{captions}

Prompts tried before, with their scores:
{tried}

{rules}
Reply with the new prompt only, on one line."""

RULES = {Recipe: "The prompt is a decoding recipe of name=value fields: method is greedy, sample or beam; "
                 "temperature > 0 and 0 < top_p <= 1 (sample); num_beams >= 1 (beam); 0 <= jitter < 1 (a shift of "
                 "the video windows the captions read). Keep level and returns as they are.",
         ChatPrompt: "The prompt is an instruction to a vision-language model shown frames of the video."}


@dataclass
class EndpointEngineer:
    """The chat endpoint rewrites the best prompt, shown its score, a few references and captions, and the last
    prompts tried. A reply that is no valid prompt is committed as a rejected iteration; an endpoint that cannot
    be reached stops the search before its iteration is committed (a rerun tries it again)."""

    endpoint: ChatEndpoint
    seed: int = 0

    def identity(self) -> dict:
        return {"engineer": "endpoint", "url": self.endpoint.url, "model": self.endpoint.model}

    def rewrite(self, best, record: dict, history: list[dict], iteration: int):
        samples = record.get("samples") or []
        message = REWRITE.format(
            k=best.returns, score=record["score"], similarity=record["similarity"], diversity=record["diversity"],
            prompt=best.text(), references="\n".join(f"- {s['reference']}" for s in samples),
            captions="\n".join(f"- {c}" for s in samples for c in s["captions"][:5]),
            tried="\n".join(f"- {r['score']:.4f}: {r['prompt']}" for r in history[-5:] if r["score"] is not None),
            rules=RULES[type(best)])
        reply = self.endpoint.complete([{"type": "text", "text": message}], temperature=1.0,
                                       seed=self.seed + iteration, request_id=f"engineer@{iteration}")
        text = reply.strip().strip("`").strip().strip('"').strip()
        return type(best).parse(text.splitlines()[0] if isinstance(best, Recipe) and text else text, best)


# ---- scoring ---------------------------------------------------------------------------------------------------

@dataclass
class Scorer:
    psi: object                   # an IndexStage: `embed_texts` of its dual encoder's text tower
    references: dict              # video_id -> [(start_s, end_s, ground truth)]
    diversity_weight: float = 1.0

    def reference(self, video_id: str, start: float, end: float) -> str | None:
        best, most = None, 0.0
        for s, e, text in self.references.get(video_id, ()):
            if min(e, end) - max(s, start) > most:
                best, most = text, min(e, end) - max(s, start)
        return best

    def score(self, captioner, store: Store, units: list[Unit], prompt, seed: int, say) -> dict:
        scored, failures = [], []
        for unit in units:
            try:
                captions = captioner.caption(store, unit, prompt, seed)
            except Exception as e:  # one unit's failure (an endpoint error, an unreadable file) leaves the rest scored
                failures.append(f"{unit.id}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
                say(failures[-1])
                continue
            for start, end, texts in captions:
                ref = self.reference(unit.video_id, start, end)
                if ref is not None and texts:
                    scored.append((unit.video_id, start, ref, texts))
        out = {"similarity": None, "diversity": None, "score": None, "units": len(scored), "failures": failures,
               "samples": [{"video_id": v, "start_s": s, "reference": r, "captions": c}
                           for v, s, r, c in scored[:SAMPLES]]}
        if not scored:
            return out
        self.psi.setup()
        emb = self.psi.embed_texts([t for _, _, ref, texts in scored for t in (ref, *texts)])
        sims, divs, i = [], [], 0
        for _, _, _, texts in scored:
            g, c = emb[i], emb[i + 1:i + 1 + len(texts)]
            i += 1 + len(texts)
            sims.append(float(np.mean(c @ g)))
            pairs = c @ c.T
            k = len(c)
            divs.append(0.0 if k < 2 else 1.0 - float(pairs.sum() - np.trace(pairs)) / (k * (k - 1)))
        similarity, diversity = float(np.mean(sims)), float(np.mean(divs))
        return out | {"similarity": similarity, "diversity": diversity,
                      "score": similarity + self.diversity_weight * diversity}


def sample_units(captioner, store: Store, level: str, size: int, seed: int):
    """A seeded sample of the train videos with ground truth at `level` that the captioner can caption, and the
    ground truth of each: (units, {video_id: [(start_s, end_s, text)]})."""
    table = read_groundtruth(store, level, "train")
    references: dict[str, list] = {}
    for r in table.to_pylist() if table is not None else []:
        references.setdefault(r["video_id"], []).append((r["start_s"], r["end_s"], r["text"]))
    if not references:
        raise FileNotFoundError(f"{store.root}: no {level} ground truth in the train split to score prompts against "
                                "(ingest ground truth: `recap ingest ego4d-hcap` or `recap demo`)")
    planned = [u for u in captioner.plan(store) if u.video_id in references]
    units = [u for u in planned if isinstance(u, Unit)]
    if not units:
        blocked = [u.reason for u in planned if isinstance(u, Blocked)]
        raise FileNotFoundError(blocked[0] if blocked else f"{store.root}: no registered video has train {level} "
                                                           "ground truth")
    picked = sorted(random.Random(seed).sample(range(len(units)), min(size, len(units))))
    units = [units[i] for i in picked]
    return units, {u.video_id: references[u.video_id] for u in units}


# ---- the search ------------------------------------------------------------------------------------------------

def replay(records: list[dict], iterations: int, patience: int) -> tuple[dict | None, int, str | None]:
    """(the best record, how many records that rests on, why the search stopped or None) after `records`."""
    best, streak = None, 0
    for t, record in enumerate(records):
        if t > 0 and (streak >= patience or t > iterations):
            return best, t, "patience" if streak >= patience else "iterations"
        if record["accepted"]:
            best, streak = record, 0
        else:
            streak += 1
    t = len(records)
    if t > 0 and (streak >= patience or t > iterations):
        return best, t, "patience" if streak >= patience else "iterations"
    return best, t, None


def committed(store: Store, run_dir: str) -> list[dict]:
    """The run's committed iterations, 0, 1, ... (the first gap ends them)."""
    records = []
    for name in store.listdir(run_dir):
        if name == f"iter-{len(records):04d}.json":
            records.append(store.read_json(f"{run_dir}/{name}"))
    return records


def run_search(config: Config, store: Store, stream=None) -> SearchResult:
    from pipeline.dag import chat_endpoint, enhance_captioner, index_stage

    stream = sys.stderr if stream is None else stream
    start = time.monotonic()
    e = config.enhance

    def say(line: str) -> None:
        print(f"[enhance] {line}", file=stream, flush=True)

    captioner = enhance_captioner(config, store)
    engineer = LocalEngineer(e.seed) if e.engineer == "local" else EndpointEngineer(chat_endpoint(config), e.seed)
    psi = index_stage(config, store)
    units, references = sample_units(captioner, store, e.level, e.sample_size, e.seed)
    scorer = Scorer(psi, references, e.diversity_weight)
    initial = captioner.initial(e.k)
    initial = type(initial).parse(e.initial, initial) if e.initial else initial
    run = fingerprint(captioner.identity(), engineer.identity(),
                      {"encoder": psi.encoder, "size": psi.size, "weights": psi.weights()},
                      {"level": e.level, "k": e.k, "diversity_weight": e.diversity_weight, "seed": e.seed,
                       "initial": asdict(initial)},
                      [(u.id, u.fingerprint) for u in units], references, length=12)
    run_dir = f"{SEARCHES}/{run}"
    store.remove_temporaries(run_dir, older_than_s=store.TMP_STALE_S)
    records = committed(store, run_dir)
    say(f"search {run_dir}: {len(units)} train video(s), level {e.level}, K = {e.k}, captioner {e.captioner}, "
        f"engineer {e.engineer}" + (f"; resuming after iteration {len(records) - 1}" if records else ""))
    while True:
        best, used, stopped = replay(records, e.iterations, e.patience)
        if stopped:
            break
        records.append(iterate(len(records), best, records, initial, captioner, engineer, scorer, store, units,
                               e.seed, say))
        store.write_json(f"{run_dir}/iter-{len(records) - 1:04d}.json", records[-1])
    result = SearchResult(run_dir, prompt_from(best["fields"]), best["score"], best["iteration"], used, stopped,
                          time.monotonic() - start)
    store.write_json(f"{run_dir}/result.json", {"prompt": best["prompt"], "fields": best["fields"],
                                                "score": best["score"], "best_iteration": best["iteration"],
                                                "iterations": used, "stopped": stopped})
    say(f"search stopped ({stopped}) after {used} iteration(s): best {result.score:.4f} at iteration "
        f"{result.best_iteration}: {best['prompt']} | wall {result.wall_s:.1f} s")
    return result


def iterate(t: int, best: dict | None, records: list[dict], initial, captioner, engineer, scorer: Scorer,
            store: Store, units: list[Unit], seed: int, say) -> dict:
    """Iteration t: rewrite the best prompt (t > 0), score it, accept it if it beats the pool's best."""
    began = time.monotonic()
    note = None
    if t == 0:
        prompt = initial
    else:
        try:
            prompt = engineer.rewrite(prompt_from(best["fields"]), best, records, t)
        except ValueError as err:  # a rewrite that is no valid prompt: rejected, the search goes on
            prompt, note = None, f"invalid rewrite: {err}"
    earlier = next((r for r in records if prompt is not None and r["prompt"] == prompt.text()), None)
    if prompt is None:
        scores = {"similarity": None, "diversity": None, "score": None, "units": 0, "failures": [], "samples": []}
    elif earlier is not None:  # tried before: its score stands, and it did not beat the best then
        scores = {k: earlier[k] for k in ("similarity", "diversity", "score", "units", "failures", "samples")}
        note = f"repeat of iteration {earlier['iteration']}"
    else:
        scores = scorer.score(captioner, store, units, prompt, seed, lambda line: say(f"iteration {t}: {line}"))
    if t == 0 and scores["score"] is None:
        raise RuntimeError(f"the initial prompt scored no unit ({len(scores['failures'])} failed"
                           + (f", first: {scores['failures'][0]}" if scores["failures"] else "") + ")")
    accepted = earlier is None and scores["score"] is not None and (best is None or scores["score"] > best["score"])
    record = {"iteration": t, "prompt": None if prompt is None else prompt.text(),
              "fields": None if prompt is None else asdict(prompt), "parent": best["prompt"] if best else None,
              **scores, "accepted": accepted, "note": note}
    after = record if accepted else best
    record |= {"best_prompt": after["prompt"], "best_score": after["score"], "wall_s": time.monotonic() - began}
    shown = "no score" if scores["score"] is None else (f"score {scores['score']:.4f} (similarity "
                                                        f"{scores['similarity']:.4f}, diversity "
                                                        f"{scores['diversity']:.4f})")
    say(f"iteration {t} | {shown} | {'accepted' if accepted else 'rejected'} | best {after['score']:.4f} | "
        f"{record['prompt'] or note}" + (f" ({note})" if note and record["prompt"] else ""))
    return record
