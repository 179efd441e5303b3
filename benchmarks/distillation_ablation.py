"""What each distillation setting buys: the same clients fused once per setting.

For every model, number of clients K, split and seed, trains K clients (as
``fusion_quality.py`` does) and fuses them with the default pipeline, changing one
distillation setting at a time: the number of steps, early stopping on held-out
synthetic inputs, a cosine learning-rate schedule, a temperature, the teacher, the share of
inputs drawn along the clients' principal components (none, all), a longer distillation
on more inputs (``long``: 8000 inputs, 1000 steps of 256); and a
DENSE-style peer (``peer_dense.py``) from the same OT fusion. Prints one
row of test accuracies per cell and the mean ± std over the seeds, with every method's
seconds (OT fusion included), and writes ``results/distillation_ablation.json`` and
``.png``.

    python benchmarks/distillation_ablation.py --models mlp cnn --clients 4 8 --seeds 0 1 2
    python benchmarks/distillation_ablation.py --dataset fashion-mnist --models mlp --clients 5
"""

from __future__ import annotations

import statistics

from fusion_quality import DEFAULT, grid_arguments, run_grid
from peer_dense import dense_distill

from otfusion.fusion import FusionConfig
from otfusion.tools.comparison import Method

EARLY = {"distill_patience": 3, "distill_eval_every": 50}
SETTINGS: dict[str, dict] = {
    "OT data-free": {"distill_steps": 0},
    DEFAULT: {},
    "mean teacher": {"distill_teacher": "mean"},
    "class-weighted teacher": {"distill_teacher": "class-weighted"},
    "mixed teacher": {"distill_teacher": "mixed"},
    "gated long": {"distill_teacher": "gated", "distill_samples": 8000, "distill_steps": 1000,
                   "distill_batch_size": 256},
    "pooled inputs": {"distill_mixture": 0.0},
    "half mixture": {"distill_mixture": 0.5},
    "no screening": {"robust_screen": False},
    "1000 steps": {"distill_steps": 1000},
    "1000 + early stop": {"distill_steps": 1000, **EARLY},
    "1000 cosine + early stop": {"distill_steps": 1000, "distill_schedule": "cosine", **EARLY},
    "300 cosine": {"distill_schedule": "cosine"},
    "T=3": {"distill_temperature": 3.0},
    "T=6": {"distill_temperature": 6.0},
    "T=3 cosine": {"distill_temperature": 3.0, "distill_schedule": "cosine"},
    "feature by feature": {"distill_correlated": 0.0},
    "all correlated": {"distill_correlated": 1.0},
    "long": {"distill_samples": 8000, "distill_steps": 1000, "distill_batch_size": 256},
    "8000 inputs": {"distill_samples": 8000},
    "1000 steps of 256": {"distill_steps": 1000, "distill_batch_size": 256},
}
"""Each method's options on top of the defaults (flat names of
:meth:`FusionConfig.from_options`)."""
PEER = "DENSE-style peer"
"""The same OT fusion distilled with ``peer_dense.dense_distill`` (a generator trained
against the teachers) for as many student steps as the default."""


def methods(names: list[str]) -> dict[str, Method]:
    """The default pipeline (label-weighted head, distilled) with each named setting."""
    chosen = {name: Method(FusionConfig.from_options(**SETTINGS[name]), label_weighted=True,
                           distilled=True) for name in names if name != PEER}
    if PEER in names:
        steps = FusionConfig().distillation.steps
        chosen[PEER] = Method(FusionConfig(), label_weighted=True, distiller=lambda fused,
                              clients, weights, moments: dense_distill(fused, clients, weights,
                                                                       moments, steps=steps))
    return chosen


def seconds_summary(rows: list[dict], names: list[str]) -> str:
    """Mean seconds of every method (OT fusion and distillation) over all the cells."""
    means = {name: statistics.mean(row[f"{name} seconds"] for row in rows) for name in names}
    return " | ".join(f"{name} {seconds:.1f}s" for name, seconds in means.items())


def main() -> None:
    parser = grid_arguments(__doc__.splitlines()[0], "distillation_ablation")
    names = [*SETTINGS, PEER]
    parser.add_argument("--settings", nargs="+", default=names, choices=names, metavar="NAME",
                        help=f"of: {', '.join(names)}")
    args = parser.parse_args()
    rows = run_grid(args, lambda model: methods(args.settings))
    if rows:
        print("mean seconds per cell: " + seconds_summary(rows, args.settings))


if __name__ == "__main__":
    main()
