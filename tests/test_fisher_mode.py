"""The Fisher pass runs with dropout off by default and leaves the global RNG as it found it.

With dropout on, each rank draws its own dropout bits for its part of a global batch, so the
Fisher estimate (and the CT-D mask) changes with the world size; `fisher_mode` switches dropout
off without `model.eval()` and forks the RNG. The multi-process check with the pretrained
MiniLM is in test_world_size_minilm.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from ctscale.config import load_config
from ctscale.errors import CtscaleError
from ctscale.methods.ct_d.fisher import fisher_mode


def _bert(dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config).train()


def _loss(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) % 64
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    out.loss.backward()
    return out.loss.detach()


def test_default_is_dropout_off():
    assert load_config(None, []).fisher.dropout is False
    assert load_config(None, ["fisher.dropout=true"]).fisher.dropout is True


def test_dropout_off_is_deterministic_and_restored():
    model = _bert(0.1)
    before = torch.get_rng_state()
    with fisher_mode(model, dropout=False) as model_step:
        assert model.training  # not model.eval(): gradient checkpointing etc. stay as in training
        with model_step():  # raises if a random number was drawn
            losses = [_loss(model), _loss(model)]
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(torch.get_rng_state(), before)
    # dropout is back on after the pass, the same rates as before (hidden and attention)
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and all(p == 0.1 for p in rates)
    assert not torch.equal(_loss(model), _loss(model))


def test_float_dropout_attributes_are_zeroed_and_restored():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_dropout=0.2,
    )
    model = LlamaForCausalLM(config).train()
    attn = model.model.layers[0].self_attn
    ids = torch.arange(12).reshape(1, 12)
    before = torch.get_rng_state()
    with fisher_mode(model, dropout=False) as model_step:
        assert attn.attention_dropout == 0.0
        with model_step():
            model(input_ids=ids, labels=ids).loss.backward()
    assert attn.attention_dropout == 0.2
    assert torch.equal(torch.get_rng_state(), before)


def test_dropout_on_draws_but_leaves_the_rng_as_found():
    """``fisher.dropout=true`` (the reference's estimator): dropout draws, in a forked RNG."""
    model = _bert(0.1)
    before = torch.get_rng_state()
    with fisher_mode(model, dropout=True) as model_step:
        with model_step():  # nothing to check: randomness is what was asked for
            assert not torch.equal(_loss(model), _loss(model))
    assert torch.equal(torch.get_rng_state(), before)


class _LayerDrop(torch.nn.Module):
    """A random layer that is not dropout: fisher_mode cannot switch it off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.rand(()) > 0.1)


def test_a_random_layer_fisher_mode_does_not_know_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _LayerDrop())
    with fisher_mode(model, dropout=False) as model_step:
        with pytest.raises(CtscaleError, match="fisher.dropout=true"), model_step():
            model(torch.ones(2, 4)).sum().backward()
