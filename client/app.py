"""The ClientApp: local training and evaluation, the same code for simulated and real
clients.

A client's data is either its partition of the run's dataset (``partition-id`` and
``num-partitions`` in the node config, which the simulation sets) or the user's own data
from ``data-path`` in the node config (an ``.npz`` file with arrays ``x`` and ``y``).

What leaves the client: the trained model's arrays (state_dict, by name), the number of
training examples (the fusion weight), the training loss, and the number of training
examples per class (``label-counts``, one integer per class of the model). The server
fuses the output layer per class with these counts as weights, so that the row of a
class comes from the clients that saw it (FedMA-style); they reveal the client's label
distribution, no features.

Unless ``send-input-moments`` is false, it also sends the per-feature mean and
variance of its training inputs (``input-mean``, ``input-var``: two numbers per input
feature, e.g. the client's mean image and per-pixel variance), and with
``send-class-moments`` the same per class (``input-class-mean``,
``input-class-var``, classes x features, and ``input-class-count``), for the classes
with at least 10 examples (the others: zeros, count 0). The server draws synthetic
inputs from them (:mod:`otfusion.fusion.moments`) to distil the fused model from the
clients' ensemble (:mod:`otfusion.fusion.distillation`); they reveal the average input
of the client's data and of each of its classes (a class's mean image), not any single
example.

With ``send-input-components`` (16 by default; 0: none) it also sends that many leading
principal components of its training inputs (``input-components``, components x
features, each scaled by the inputs' standard deviation along it), at most one per 10
examples: the directions in which its inputs vary most together (for images, blurred
"eigen-images" such as a garment's silhouette), along which the server's synthetic
inputs are then correlated as real ones are. Each is a weighted sum of at least ten
centred examples, like the moments an aggregate of the data, not any single example.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from otfusion.fusion.moments import input_moments
from otfusion.task.config import RunConfig
from otfusion.task.data import (
    TensorData,
    label_counts,
    load_digits_dataset,
    load_federated_partition,
    load_npz,
    partition,
)
from otfusion.task.training import evaluate, model_inputs, train


@lru_cache(maxsize=4)
def _digits_partitions(config: RunConfig, num_partitions: int, split: str) -> list[TensorData]:
    train_data, test_data = load_digits_dataset(seed=config.seed)
    data = train_data if split == "train" else test_data
    return partition(data, num_partitions, config.partitioner, alpha=config.alpha,
                     seed=config.seed)


def client_data(config: RunConfig, node_config: Mapping[str, object], split: str) -> TensorData:
    """This client's training or evaluation data: the node's own file (``data-path``),
    or partition ``partition-id`` of ``num-partitions`` of the run's ``dataset``: the
    embedded digits, or a Hugging Face Hub dataset through flwr-datasets (``mnist``,
    ``cifar10`` or a hub id; downloaded on first use)."""
    if "data-path" in node_config:
        return load_npz(str(node_config["data-path"]), split)
    if "partition-id" not in node_config:
        raise ValueError("the node config has neither 'data-path' nor 'partition-id': give "
                         "the client its data with --node-config \"data-path='FILE.npz'\"")
    partition_id = int(node_config["partition-id"])
    num_partitions = int(node_config["num-partitions"])
    if config.dataset == "digits":
        return _digits_partitions(config, num_partitions, split)[partition_id]
    return load_federated_partition(config.dataset, partition_id, num_partitions,
                                    config.partitioner, alpha=config.alpha, seed=config.seed,
                                    split=split)


def client_statistics(config: RunConfig, model, data: TensorData) -> dict[str, list]:
    """What a client reports besides its model: ``label-counts`` (its training examples
    per class) and, with ``send-input-moments``, ``input-mean`` and ``input-var`` (the
    per-feature moments of its training inputs, flattened) and, with
    ``send-input-components``, ``input-components`` (flattened)."""
    classes = getattr(model, "num_classes", None)
    statistics: dict[str, list] = {"label-counts": [int(c) for c in label_counts(data,
                                                                                   classes)]}
    if config.send_input_moments:
        labels = data.y if config.send_class_moments and classes else None
        moments = input_moments(model_inputs(model, data), labels, classes,
                                components=config.send_input_components)
        statistics["input-mean"] = moments.mean.flatten().tolist()
        statistics["input-var"] = moments.var.flatten().tolist()
        if moments.components is not None:
            statistics["input-components"] = moments.components.flatten().tolist()
        if labels is not None:
            statistics["input-class-mean"] = moments.class_mean.flatten().tolist()
            statistics["input-class-var"] = moments.class_var.flatten().tolist()
            statistics["input-class-count"] = moments.class_count.tolist()
    return statistics


def _local_model(config: RunConfig, msg: Message, context: Context):
    """The model to train: the server's arrays, or in a one-shot first round with
    ``client-init=local-seed`` a fresh model from this client's own seed."""
    server_round = int(msg.content["config"].get("server-round", 1))
    node = int(context.node_config.get("partition-id", context.node_id % 2**31))
    if config.client_init == "local-seed" and server_round == 1:
        return config.build_model(seed=config.client_seed(node)), node
    model = config.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model, node


def train_handler(config: RunConfig, msg: Message, context: Context) -> Message:
    """Train locally and reply with the model's arrays, ``num-examples``,
    ``label-counts`` and (if ``send-input-moments``) ``input-mean`` and ``input-var``."""
    data = client_data(config, context.node_config, "train")
    model, node = _local_model(config, msg, context)
    start = time.perf_counter()
    loss = train(model, data, epochs=config.local_epochs, lr=config.lr,
                 batch_size=config.batch_size, optimizer=config.optimizer,
                 seed=config.client_seed(node))
    metrics = MetricRecord({"train-loss": float(loss), "num-examples": len(data),
                            "train-seconds": time.perf_counter() - start,
                            **client_statistics(config, model, data)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def evaluate_handler(config: RunConfig, msg: Message, context: Context) -> Message:
    """Evaluate the server's arrays on this client's test data."""
    data = client_data(config, context.node_config, "test")
    model = config.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = evaluate(model, data)
    metrics = MetricRecord({"eval-loss": float(loss), "eval-accuracy": float(accuracy),
                            "num-examples": len(data)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def create_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp that runs with ``config``, or by default with the run config of the
    Flower run."""
    client_app = ClientApp()

    def settings(context: Context) -> RunConfig:
        return config or RunConfig.from_run_config(context.run_config)

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train_handler(settings(context), msg, context)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_handler(settings(context), msg, context)

    return client_app


app = create_client_app()
