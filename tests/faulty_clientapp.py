"""A ClientApp for the fault tests: this package's ClientApp, whose train reply is then
damaged as the SuperNode's node config says.

Node config keys (besides ``data-path``):

- ``faults``: comma-separated fault per server round (``none`` for an honest reply);
  see :data:`FAULTS`. ``hang`` writes ``marker`` and sleeps: the test kills the node.
- ``dump``: folder where an honest reply is saved as ``round-<r>.safetensors`` (with its
  ``num-examples``), so the test can fuse the good replies itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import save_file

from otfusion.client.app import train_handler
from otfusion.task.config import RunConfig
from otfusion.zoo import build_model


def _set(state, name, tensor):
    return {**state, name: tensor}


FAULTS = {
    "nan": lambda s: _set(s, "layers.0.weight", s["layers.0.weight"].index_fill(0, torch.tensor(
        [0]), float("nan"))),
    "inf": lambda s: _set(s, "head.bias", s["head.bias"].index_fill(0, torch.tensor(
        [1]), float("inf"))),
    "shape": lambda s: _set(s, "head.bias", s["head.bias"][:-1]),
    "missing-key": lambda s: {k: v for k, v in s.items() if k != "layers.2.bias"},
    "extra-key": lambda s: _set(s, "layers.9.weight", torch.zeros(3, 3)),
    "dtype": lambda s: _set(s, "layers.0.bias", s["layers.0.bias"].to(torch.int32)),
    "huge": lambda s: _set(s, "layers.2.weight", s["layers.2.weight"] * 1e9),
    "architecture": lambda s: build_model("cnn", seed=0).state_dict(),
}
BAD_EXAMPLES = {"zero-examples": 0, "negative-examples": -5}

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    server_round = int(msg.content["config"]["server-round"])
    faults = str(context.node_config.get("faults", "none")).split(",")
    fault = faults[(server_round - 1) % len(faults)]
    if fault == "hang":
        Path(str(context.node_config["marker"])).write_text(str(server_round))
        time.sleep(3600)
    reply = train_handler(RunConfig.from_run_config(context.run_config), msg, context)
    state = reply.content["arrays"].to_torch_state_dict()
    examples = int(reply.content["metrics"]["num-examples"])
    if fault == "none" and "dump" in context.node_config:
        folder = Path(str(context.node_config["dump"]))
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(folder / f"round-{server_round}.safetensors"),
                  metadata={"num-examples": str(examples)})
    elif fault in FAULTS:
        state = FAULTS[fault](state)
    elif fault in BAD_EXAMPLES:
        examples = BAD_EXAMPLES[fault]
    elif fault != "none":
        raise ValueError(f"unknown fault {fault!r}")
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord({"num-examples": examples})})
    return Message(content=content, reply_to=msg)
