"""Alternating blocks: one benchmark against PyTorch run as several fresh processes, each
timing ours and then PyTorch's, so both sides sample the same stretches of a machine whose
speed drifts (on a shared 2-core VM, PyTorch's own time moved 38% between two runs).

Each block is a child `diffusion-jax bench WHAT --compare torch ... --json FILE`; a block's
ratio compares the two sides run minutes apart, not runs hours apart. The summary is the
median ratio over blocks and its spread (min, max); more blocks narrow what the median can
be, at the cost of one process start and compile per block.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

# Per-block figures the summary replaces by their median over blocks (and lists per block).
TIMES = ("median_s", "torch_median_s", "seconds_per_image", "torch_seconds_per_image")


def summarize(results: Sequence[Mapping[str, Any]]) -> dict:
    """One result of the blocks' results: the last block's figures, with the ratio and the
    times replaced by their medians over blocks, each block's values and the spread."""
    ratios = [r["ratio_vs_torch"] for r in results]
    summary = dict(results[-1])
    summary.update(blocks=len(results), ratio_vs_torch=statistics.median(ratios),
                   ratio_vs_torch_min=min(ratios), ratio_vs_torch_max=max(ratios),
                   ratio_vs_torch_blocks=[round(r, 4) for r in ratios])
    for key in TIMES:
        if key in summary:
            values = [r[key] for r in results]
            summary[key] = statistics.median(values)
            summary[f"{key}_blocks"] = [round(v, 4) for v in values]
    return summary


def run_blocks(bench_argv: Sequence[str], blocks: int) -> dict:
    """The summary of `blocks` child processes of `diffusion-jax bench *bench_argv` (an
    argument list that includes --compare torch), run one after another, each's progress
    line on stderr."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for block in range(blocks):
            out = Path(tmp) / f"block{block}.json"
            done = subprocess.run([sys.executable, "-m", "diffusion_jax.cli", "bench",
                                   *bench_argv, "--json", str(out)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:  # its own message says why; ours says which block
                sys.stderr.write(done.stderr[-4000:])
                raise ValueError(f"bench block {block + 1} of {blocks} failed (its error above)")
            results.append(json.loads(out.read_text()))
            print(f"block {block + 1}/{blocks}: ratio_vs_torch "
                  f"{results[-1]['ratio_vs_torch']:.3f}", file=sys.stderr, flush=True)
    return summarize(results)
