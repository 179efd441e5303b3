"""Bit-identity check for refactorings: fuse zoo models under several configurations,
save the fused state_dicts, and later compare a new run with the saved one.

    python benchmarks/fusion_snapshot.py save results/before.pt     # before the change
    python benchmarks/fusion_snapshot.py compare results/before.pt  # after it

Covers 7 model families (MLP, CNN, VGG-11, ResNet-20, 2-layer LSTM, GRU, RNN; 3 clients
of independent seeds, client and per-class weights) under 6 configurations (default,
the paper's, Sinkhorn, Gromov-Wasserstein, average, distilled), and one ``align`` each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from otfusion.fusion import FusionConfig, align, fuse_result, input_moments
from otfusion.zoo import build_model

CASES = [("mlp", {"widths": (32, 16)}), ("cnn", {"channels": (4, 8), "hidden": 12}),
         ("vgg11", {"width_multiplier": 0.125}), ("resnet20", {"width_multiplier": 0.25}),
         ("lstm", {"hidden_size": 8, "num_layers": 2}), ("gru", {"hidden_size": 8}),
         ("rnn", {"hidden_size": 8})]
CONFIGS = {
    "default": {"distill_steps": 0},
    "paper": {"neuron_weights": "uniform", "rescale": "none", "distill_steps": 0},
    "sinkhorn": {"solver": "sinkhorn", "distill_steps": 0},
    "gw": {"method": "gromov-wasserstein", "distill_steps": 0},
    "average": {"method": "average", "distill_steps": 0},
    "distill": {"distill_steps": 20, "distill_samples": 64},
}
CLASS_WEIGHTS = [[1] * 10, [2] * 10, [0] * 5 + [3] * 5]


def snapshot() -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, kwargs in CASES:
        models = [build_model(name, seed=s, **kwargs) for s in range(3)]
        x = torch.randn(8, *models[0].input_shape, generator=torch.Generator().manual_seed(0))
        for label, settings in CONFIGS.items():
            result = fuse_result(models, [1, 2, 3], FusionConfig.from_options(**settings),
                                 class_weights=CLASS_WEIGHTS,
                                 input_moments=input_moments(x) if label == "distill" else None)
            out[f"{name}/{label}"] = result.model.state_dict()
        out[f"{name}/align"] = align(models[1], models[0]).state_dict()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["save", "compare"])
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    current = snapshot()
    if args.mode == "save":
        args.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(current, args.path)
        print(f"saved {len(current)} fusions to {args.path}")
        return
    saved = torch.load(args.path)
    if saved.keys() != current.keys():
        raise SystemExit(f"different cases: {sorted(saved.keys() ^ current.keys())}")
    differing = 0
    for case, state in saved.items():
        for key, tensor in state.items():
            if not torch.equal(tensor, current[case][key]):
                differing += 1
                gap = (tensor.double() - current[case][key].double()).abs().max().item()
                print(f"DIFF {case} {key}: max |difference| {gap:.3g}")
    print(f"compared {len(saved)} fusions, {differing} differing tensors")


if __name__ == "__main__":
    main()
