"""The ``otfusion`` command: operator tools around the fusion engine."""

from __future__ import annotations

import argparse
import json
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch import nn

from otfusion.fusion import FusionConfig, TransportConfig, fuse_result, input_moments
from otfusion.fusion.config import option_name
from otfusion.fusion.distillation import Progress
from otfusion.task.config import INPUT_COMPONENTS, RunConfig, json_object
from otfusion.task.data import as_input, label_counts, load_digits_dataset, load_npz, partition
from otfusion.task.training import model_inputs, recipe_for
from otfusion.zoo import available_models, build_model

from .comparison import DEFAULT_METHODS, client_input_moments, compare, train_clients
from .lmc import interpolation_barrier


def _demo(args: argparse.Namespace) -> None:
    console = Console()
    train_data, test_data = load_digits_dataset(seed=args.seed)
    parts = partition(train_data, args.clients, args.partitioner, alpha=args.alpha,
                      seed=args.seed)
    console.print(
        f"[bold]One-shot fusion demo[/]: {args.clients} '{args.model}' clients on "
        f"scikit-learn digits ({args.partitioner} split, sizes {[len(p) for p in parts]}), "
        "each from its own initialisation."
    )
    recipe = recipe_for(args.model)
    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    with console.status(f"training clients ({recipe})"):
        clients = train_clients(args.model, parts, recipe, seed=args.seed)
    counts = [label_counts(p, getattr(clients[0], "num_classes", None)).tolist() for p in parts]
    weights = [float(sum(c)) for c in counts]
    with console.status("fusing"):
        result = compare(clients, weights, test_data, DEFAULT_METHODS, label_counts=counts,
                         input_moments=client_input_moments(clients[0], parts))
    table = Table(title=f"test accuracy on {len(test_data)} held-out digits")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("fusion time", justify="right")
    for name, accuracy in result.rows():
        seconds = result.seconds.get(name)
        table.add_row(name, f"{accuracy:.2%}", "" if seconds is None else f"{seconds:.3f} s")
    console.print(table)


def _load_model(path: Path, name: str, kwargs: dict) -> nn.Module:
    """The model ``name`` (zoo name or import path) with the safetensors checkpoint
    ``path`` loaded (eval mode); ``ValueError`` naming the file and the keys when it is
    missing or does not fit."""
    try:
        model = build_model(name, seed=0, **kwargs)
    except TypeError as error:
        raise ValueError(str(error)) from None
    if not path.is_file():
        raise ValueError(f"no such checkpoint file: {path}")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own (Rust) error types
        raise ValueError(f"cannot read {path} as safetensors: {error}") from None
    expected = model.state_dict()
    problems = [
        f"{kind} {_listing(sorted(keys))}" for kind, keys in (
            ("missing keys", expected.keys() - state.keys()),
            ("unexpected keys", state.keys() - expected.keys())) if keys
    ]
    shapes = [f"{key} {tuple(state[key].shape)} (model {tuple(tensor.shape)})"
              for key, tensor in expected.items()
              if key in state and state[key].shape != tensor.shape]
    if shapes:
        problems.append(f"shape mismatch: {_listing(shapes)}")
    if problems:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval()


def _listing(items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _fusion_config(args: argparse.Namespace) -> FusionConfig:
    options = {"method": args.method, "solver": args.solver, "reg": args.reg,
               "cost": args.cost, "max_iter": args.max_iter}
    try:
        return FusionConfig.from_options(**{k: v for k, v in options.items() if v is not None})
    except ValidationError as error:
        problems = "; ".join(
            f"--{option_name(e['loc']).replace('_', '-')}: {e['msg']}"
            for e in error.errors())
        raise ValueError(f"invalid fusion option: {problems}") from None


def _activation_inputs(args: argparse.Namespace, config: FusionConfig,
                       model: nn.Module) -> torch.Tensor | None:
    """The batch for ``cost="activations"``: ``--inputs`` or the digits training split."""
    if config.cost != "activations":
        return None
    data = load_npz(args.inputs) if args.inputs else load_digits_dataset(seed=args.seed)[0]
    return as_input(data, model.input_shape)


@contextmanager
def distillation_bar(console: Console, steps: int) -> Iterator[Progress]:
    """A progress bar of the distillation's steps and divergence, shown from its first
    report (a fusion that is not distilled shows none) and gone when it is done."""
    columns = (TextColumn("distilling"), BarColumn(), MofNCompleteColumn(),
               TextColumn("KL {task.fields[divergence]}"), TimeElapsedColumn())
    with ProgressBar(*columns, console=console, transient=True) as bar:
        task = bar.add_task("distilling", total=steps, divergence="-", visible=False)

        def update(step: int, total: int, divergence: float) -> None:
            bar.update(task, completed=step, total=total, divergence=f"{divergence:.4f}",
                       visible=True)

        yield update


def _fuse(args: argparse.Namespace) -> None:
    if args.weights is not None and len(args.weights) != len(args.checkpoints):
        raise ValueError(
            f"got {len(args.weights)} --weights for {len(args.checkpoints)} checkpoints"
        )
    kwargs = json_object(args.model_kwargs, "--model-kwargs")
    config = _fusion_config(args)
    models = [_load_model(path, args.model, kwargs) for path in args.checkpoints]
    inputs = _activation_inputs(args, config, models[0])
    moments = (input_moments(model_inputs(models[0], load_npz(args.distill_from)),
                             components=INPUT_COMPONENTS) if args.distill_from else None)
    console = Console()
    with distillation_bar(console, config.distillation.steps) as progress:
        result = fuse_result(models, args.weights, config, inputs=inputs,
                             input_moments=moments, progress=progress)
    state = {key: tensor.contiguous() for key, tensor in result.model.state_dict().items()}
    try:
        save_file(state, str(args.output),
                  metadata={"model": args.model, "model_kwargs": json.dumps(kwargs)})
    except Exception as error:  # safetensors raises its own (Rust) error types
        raise ValueError(f"cannot write {args.output}: {error}") from None
    distilled = ("" if result.distill_loss is None else
                 f"; distilled in {result.distill_seconds:.1f} s to a KL divergence of "
                 f"{result.distill_loss:.4f} from their ensemble")
    console.print(
        f"fused {len(models)} '{args.model}' checkpoints ({config.method}, "
        f"{config.transport.solver}) into [bold]{args.output}[/]{distilled}"
    )


def _lmc(args: argparse.Namespace) -> None:
    kwargs = json_object(args.model_kwargs, "--model-kwargs")
    config = _fusion_config(args)
    a, b = (_load_model(path, args.model, kwargs) for path in (args.a, args.b))
    _, test_data = load_digits_dataset(seed=args.seed)
    as_input(test_data, a.input_shape)  # fails early, naming both shapes, if they do not fit
    console = Console()
    with console.status("aligning and interpolating"):
        report = interpolation_barrier(a, b, test_data, args.steps, args.batchnorm, config,
                                       _activation_inputs(args, config, a))
    before, after = report.before, report.after
    table = Table(
        title=f"linear mode connectivity on {len(test_data)} held-out digits, {args.steps} "
              f"points (BatchNorm statistics: {args.batchnorm})",
        caption=f"endpoints: a loss {before.loss[0]:.4f} acc {before.accuracy[0]:.2%}, "
                f"b loss {before.loss[-1]:.4f} acc {before.accuracy[-1]:.2%}",
    )
    for column in ("path", "loss barrier", "accuracy barrier", "max loss", "min accuracy"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, curve in (("a -> b", before), ("a -> align(b, a)", after)):
        table.add_row(name, f"{curve.loss_barrier:.4f}", f"{curve.accuracy_barrier:.2%}",
                      f"{max(curve.loss):.4f}", f"{min(curve.accuracy):.2%}")
    console.print(table)


def _model_name(value: str) -> str:
    """A zoo model name or an import path ``package.module:callable``."""
    if value in available_models() or ":" in value:
        return value
    raise argparse.ArgumentTypeError(
        f"invalid choice: {value!r} (a zoo model: {', '.join(available_models())}; or your "
        "own as package.module:callable)")


def _choices(model: type[BaseModel], field: str) -> list[str]:
    """The values of a Literal field of a pydantic model: one list for the flag and the
    setting it fills."""
    return list(typing.get_args(model.model_fields[field].annotation))


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=_model_name,
                        help="the model the checkpoints were saved from: a zoo name, or "
                        "your own as package.module:callable")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help='keyword arguments of the model, e.g. {"widths": [64, 32]}')
    parser.add_argument("--method", choices=_choices(FusionConfig, "method"))
    parser.add_argument("--solver", choices=_choices(TransportConfig, "solver"))
    parser.add_argument("--reg", type=float, help="entropic regularisation (sinkhorn)")
    parser.add_argument("--cost", choices=_choices(FusionConfig, "cost"))
    parser.add_argument("--max-iter", type=int, help="barycenter iterations per layer group")
    parser.add_argument("--inputs", metavar="NPZ",
                        help="inputs for --cost activations (array 'x'; default: the digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the digits split")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otfusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train clients on the embedded digits data, fuse them, print a table"
    )
    demo.add_argument("--model", default="mlp", type=_model_name,
                      help="a zoo name, or your own model as package.module:callable")
    demo.add_argument("--clients", type=int, default=8)
    demo.add_argument("--partitioner", default="iid", choices=_choices(RunConfig, "partitioner"))
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    demo.add_argument("--epochs", type=int, help="default: the model's training recipe")
    demo.add_argument("--lr", type=float, help="default: the model's training recipe")
    demo.add_argument("--batch-size", type=int, help="default: the model's training recipe")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    fuse_command = commands.add_parser(
        "fuse", help="fuse safetensors checkpoints of one zoo model into one checkpoint"
    )
    fuse_command.add_argument("checkpoints", nargs="+", type=Path, metavar="CHECKPOINT")
    fuse_command.add_argument("-o", "--output", required=True, type=Path,
                              help="where to write the fused safetensors file")
    fuse_command.add_argument("--weights", nargs="+", type=float,
                              help="one weight per checkpoint (default: uniform)")
    fuse_command.add_argument("--distill-from", metavar="NPZ",
                              help="distil the fused model from the checkpoints' ensemble "
                                   "on synthetic inputs drawn from the per-feature mean and "
                                   "variance of this file's array 'x'")
    _add_model_options(fuse_command)
    fuse_command.set_defaults(run=_fuse)
    lmc = commands.add_parser(
        "lmc", help="loss and accuracy barrier between two checkpoints, before and after "
                    "aligning the second to the first"
    )
    lmc.add_argument("a", type=Path, help="checkpoint at t=0, the alignment reference")
    lmc.add_argument("b", type=Path, help="checkpoint at t=1, aligned to a")
    lmc.add_argument("--steps", type=int, default=11, help="points on the segment, ends included")
    lmc.add_argument("--batchnorm", default="interpolate", choices=["interpolate", "recompute"],
                     help="interpolate BatchNorm running statistics or recompute them on "
                          "the test data")
    _add_model_options(lmc)
    lmc.set_defaults(run=_lmc)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        parser.exit(1, f"otfusion {args.command}: error: {error}\n")
