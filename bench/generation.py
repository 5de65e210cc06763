"""Generation benchmark: key/value-cached greedy decoding vs re-running the full prefix every step.

A GPT-2-base-size gated decoder (random weights) reads 512 queries of width 768; batch 32; 77 new
tokens. EOS is ignored so both modes generate every token. Each mode runs in its own process, so
its peak memory is its own. Prints figures; asserts nothing.

    python -m bench.generation [--batch 32] [--queries 512] [--tokens 77] [--recompute-steps 77]

`--recompute-steps` below `--tokens` times only the first steps of the recompute mode (the cheap
ones: a step costs about prefix-length times more than a cached one), which flatters it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time

import psutil
import torch

from models.generation import generate, generate_official
from models.gpt2_gated import GatedGPT2LMHeadModel
from models.recap import RecapConfig


def run(mode: str, batch: int, n_queries: int, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = RecapConfig.preset("video")  # GPT-2 base decoder, 768-wide queries
    decoder = GatedGPT2LMHeadModel(config.gpt2_config()).eval()
    queries = torch.randn(batch, n_queries, config.qformer_hidden_size)
    bos = config.bos_token_id
    generate(decoder, queries[:1], bos_id=bos, eos_id=None, max_new_tokens=2)  # warm-up: first-call allocations
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if mode == "cached":
        generate(decoder, queries, bos_id=bos, eos_id=None, max_new_tokens=steps)
    else:  # eos -1 never matches: all steps run
        generate_official(decoder, queries, bos_id=bos, eos_id=-1, max_text_length=steps + 1)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"mode": mode, "steps": steps, "seconds": seconds, "tokens_per_s": batch * steps / seconds,
            "peak_rss_gib": peak / 2**30, "peak_above_model_gib": (peak - rss_before) / 2**30}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--recompute-steps", type=int, default=None, help="default: --tokens")
    args = parser.parse_args()
    recompute_steps = args.recompute_steps or args.tokens

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"decoder GPT-2 base + gated cross-attention, batch {args.batch}, {args.queries} queries, fp32, CPU")
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        results = [pool.apply(run, (mode, args.batch, args.queries, steps))
                   for mode, steps in (("cached", args.tokens), ("recompute", recompute_steps))]
    for r in results:
        print(f"{r['mode']:>9}: {r['steps']:3d} steps in {r['seconds']:7.1f} s = {r['tokens_per_s']:7.1f} tokens/s, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB ({r['peak_above_model_gib']:+.2f} GiB during generation)")
    cached, recompute = results
    print(f" speed-up: {cached['tokens_per_s'] / recompute['tokens_per_s']:.1f}x tokens/s"
          + ("" if recompute["steps"] == cached["steps"] else
             f" (recompute timed over its first {recompute['steps']} of {cached['steps']} steps only)"))
    print(f"recompute keeps every step's logits ({args.batch}x{recompute_steps}x50257 fp32 = "
          f"{args.batch * recompute_steps * 50257 * 4 / 2**30:.2f} GiB) for fixture comparisons")


if __name__ == "__main__":
    main()
