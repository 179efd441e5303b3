"""A Hugging Face BERT, fused through the README's explicit spec (``hf_bert.py``).

``transformers`` models cannot be traced by ``torch.fx``; the README writes their axes
as data (:func:`otfusion.fusion.alignment_spec`). That very ``bert_spec`` is checked
here against a permutation of BERT written by hand with the helpers of
``tests/attention_models.py`` (torch only, nothing from the engine): one permutation of
the residual stream through the embeddings, every LayerNorm and every layer; whole heads,
with Q/K sharing one within-head permutation and V/output another; the feed-forward
units; the pooler's units. A permuted copy computes the same function, so fusing a model
with two permuted copies must give it back, and aligning a copy onto the original must
give back the original's weights.

Tolerances: relative L2 difference of the logits 1e-5; weights 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from attention_models import Plan, randomize_
from readme_blocks import readme_file
from reindex import random_perm, take

transformers = pytest.importorskip("transformers")

TOL = 1e-5
DIM, HEADS = 8, 2


def bert_spec(config):
    namespace = {"__name__": "hf_bert"}
    exec(compile(readme_file("hf_bert.py"), "README.md: hf_bert.py", "exec"), namespace)
    return namespace["bert_spec"](config)


def config():
    return transformers.BertConfig(
        vocab_size=12, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=16, max_position_embeddings=8, num_labels=3,
        initializer_range=0.5)


def build(seed: int):
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config()).eval()
    return randomize_(model, torch.Generator().manual_seed(100 + seed))


def permute_bert(model, generator: torch.Generator):
    """A copy of ``model`` that computes the same function, its units permuted."""
    permuted = copy.deepcopy(model)
    plan = Plan(generator, dim=DIM, heads=HEADS)
    bert = permuted.bert
    with torch.no_grad():
        for table in (bert.embeddings.word_embeddings, bert.embeddings.position_embeddings,
                      bert.embeddings.token_type_embeddings):
            take(table.weight, 1, plan.stream)
        plan.norm(bert.embeddings.LayerNorm)
        for layer in bert.encoder.layer:
            attention = layer.attention
            plan.separate_attention(attention.self.query, attention.self.key,
                                    attention.self.value, attention.output.dense)
            plan.norm(attention.output.LayerNorm)
            plan.mlp(layer.intermediate.dense, layer.output.dense)
            plan.norm(layer.output.LayerNorm)
        pooled = random_perm(DIM, generator)
        take(bert.pooler.dense.weight, 1, plan.stream)
        take(bert.pooler.dense.weight, 0, pooled)
        take(bert.pooler.dense.bias, 0, pooled)
        take(permuted.classifier.weight, 1, pooled)
    return permuted


def relative_gap(model, reference, tokens) -> float:
    with torch.no_grad():
        expected = reference(tokens).logits
        return float((model(tokens).logits - expected).norm() / expected.norm())


def tokens(seed: int = 0):
    return torch.randint(0, 12, (6, 7), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def engine():
    from otfusion.fusion import FusionConfig, align, fuse

    return FusionConfig.from_options(distill_steps=0), fuse, align


def test_the_hand_written_permutation_keeps_the_function_and_moves_every_layer():
    model = build(0)
    permuted = permute_bert(model, torch.Generator().manual_seed(1))
    assert relative_gap(permuted, model, tokens()) < TOL
    moved = [name for name, tensor in permuted.state_dict().items()
             if not torch.equal(tensor, model.state_dict()[name])]
    assert "bert.encoder.layer.1.attention.self.key.weight" in moved
    assert "bert.pooler.dense.weight" in moved and "classifier.weight" in moved


@pytest.mark.parametrize("seed", [0, 1])
def test_a_bert_fused_with_permuted_copies_of_itself_computes_its_function(engine, seed):
    config_, fuse, _ = engine
    model = build(seed)
    generator = torch.Generator().manual_seed(10 + seed)
    copies = [permute_bert(model, generator) for _ in range(2)]
    fused = fuse([copies[0], model, copies[1]], config=config_, graph=bert_spec(config()))
    assert relative_gap(fused, model, tokens(seed)) < TOL


def test_aligning_a_permuted_bert_gives_back_the_original(engine):
    config_, _, align = engine
    model = build(2)
    permuted = permute_bert(model, torch.Generator().manual_seed(3))
    aligned = align(permuted, model, config=config_, graph=bert_spec(config()))
    for name, tensor in model.state_dict().items():
        assert torch.allclose(aligned.state_dict()[name], tensor, atol=TOL), name


def test_align_keeps_the_function_of_an_independent_bert(engine):
    config_, _, align = engine
    a, b = build(4), build(5)
    aligned = align(b, a, config=config_, graph=bert_spec(config()))
    assert relative_gap(aligned, b, tokens()) < TOL
    assert not torch.equal(aligned.bert.encoder.layer[0].intermediate.dense.weight,
                           b.bert.encoder.layer[0].intermediate.dense.weight)
