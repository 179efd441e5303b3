"""Time to derive the alignment graph of the zoo's Llama (rotary grouped-query
attention), by depth, and how many walks of the traced graph it took.

Rotary queries and keys keep their units in place: the tracer finds those heads in one
walk and walks the graph again with them in place, so a rotary model takes two walks
where a model without rotary embeddings takes one. Each time is the best of
``--repeats`` builds with the graph cache emptied, in this process.

    python benchmarks/graph_tracing.py
    python benchmarks/graph_tracing.py --depths 2 12 48 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch

from otfusion.fusion import build_alignment_graph
from otfusion.fusion.graph import tracer
from otfusion.zoo import build_model


def timed_build(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, int]:
    """Best time of ``repeats`` graph builds, and the walks one build took."""
    walks = []
    walk = tracer.Tracer.walk

    def counted(self, gm):
        walks.append(1)
        return walk(self, gm)

    best = float("inf")
    tracer.Tracer.walk = counted
    try:
        for _ in range(repeats):
            tracer._GRAPHS.clear()
            walks.clear()
            start = time.perf_counter()
            build_alignment_graph(model, x)
            best = min(best, time.perf_counter() - start)
    finally:
        tracer.Tracer.walk = walk
    return best, len(walks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", nargs="+", type=int, default=[2, 12, 48])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| layers | walks | seconds | seconds per layer |")
    print("|---|---|---|---|")
    for depth in args.depths:
        model = build_model("llama", seed=0, dim=64, heads=4, kv_heads=2, hidden=128,
                            depth=depth).eval()
        x = torch.randn(2, *model.input_shape)
        seconds, walks = timed_build(model, x, args.repeats)
        print(f"| {depth} | {walks} | {seconds:.2f} | {seconds / depth:.3f} |")


if __name__ == "__main__":
    main()
