"""Replies fabricated for the strategies, without a Flower runtime: the small MLP they
fuse, client states, train-reply Messages (Message API) and the ClientProxy stub of the
legacy API, the order in which the strategies fuse replies, the engine's direct fusion
to compare with, and a Grid that answers every train message."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from flwr.app import (
    ArrayRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.server.client_proxy import ClientProxy
from torch import nn

from otfusion.fusion import FusionConfig, fuse_result
from otfusion.strategies.replies import reply_digest
from otfusion.zoo import build_model

WIDTHS = (16, 8)


def global_model() -> nn.Module:
    return build_model("mlp", widths=WIDTHS, seed=0)


def client_states(count: int = 3, widths=WIDTHS) -> list[OrderedDict]:
    return [build_model("mlp", widths=widths, seed=10 + k).state_dict() for k in range(count)]


def metadata(node_id: int, message_type: str = MessageType.TRAIN) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=1,
                    reply_to_message_id="ins", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=message_type)


def reply(node_id: int, arrays, n=10, **metrics) -> Message:
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    content = RecordDict({"arrays": record,
                          "metrics": MetricRecord({"num-examples": n, **metrics})})
    return Message(content=content, metadata=metadata(node_id))


def error_reply(node_id: int, reason: str = "client crashed") -> Message:
    return Message(error=Error(code=0, reason=reason), metadata=metadata(node_id))


def load(state) -> nn.Module:
    model = global_model()
    model.load_state_dict(state)
    return model


def fusion_order(states, weights, moments=None) -> list[int]:
    """Indices of ``states`` in the order the strategies fuse them (by content digest,
    with each reply's input ``moments`` when it sent them)."""
    sent = moments or [None] * len(states)
    return sorted(range(len(states)),
                  key=lambda k: reply_digest(states[k], weights[k], None, sent[k]))


def direct_fusion(states, weights, config: FusionConfig | None = None):
    return fuse_result([load(s) for s in states], weights=weights, config=config,
                       target=global_model())


class FakeGrid:
    """Answers every train message with ``reply_for(round, node_id)``."""

    def __init__(self, reply_for):
        self.reply_for = reply_for
        self.sent: list[tuple[int, ArrayRecord]] = []

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        out = []
        for msg in messages:
            rnd = int(msg.content["config"]["server-round"])
            self.sent.append((rnd, msg.content["arrays"]))
            out.append(self.reply_for(rnd, msg.metadata.dst_node_id))
        return out


class StubProxy(ClientProxy):
    """aggregate_fit only reads ``cid``; the RPC methods are never called."""

    def get_properties(self, *args, **kwargs):
        raise NotImplementedError

    def get_parameters(self, *args, **kwargs):
        raise NotImplementedError

    def fit(self, *args, **kwargs):
        raise NotImplementedError

    def evaluate(self, *args, **kwargs):
        raise NotImplementedError

    def reconnect(self, *args, **kwargs):
        raise NotImplementedError


def warnings_text(caplog) -> str:
    """The WARNING+ messages captured by ``caplog``."""
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
