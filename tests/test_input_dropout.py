"""model.input_dropout: locked dropout on the embedded characters that layer 0 reads, one
(B, E) mask per window, drawn after the layer-output masks. Every test runs on the compiled
kernels and on numpy; the gradients are checked by central differences in
tests/test_gradients.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from charrnn.cells import CELLS
from charrnn.config import ConfigError, config_from_dict
from charrnn.model import CharRNN, ModelShape

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and numpy

V, T, B, E, H = 7, 5, 4, 3, 6


def _model(cell: str, dropout: float = 0.3, input_dropout: float = 0.4,
           dtype: str = "float64") -> CharRNN:
    shape = ModelShape(cell, V, hidden_size=H, num_layers=2, embedding_size=E,
                       dropout=dropout, input_dropout=input_dropout)
    model = CharRNN.create(shape, seed=3, dtype=dtype)
    rng = np.random.default_rng(0)
    for p in model.params.values():
        p += (0.1 * rng.standard_normal(p.shape)).astype(p.dtype)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_masks_follow_the_layer_masks(dropout: float) -> None:
    """The layer masks are those drawn without input dropout (the same draws, first); the
    input mask is then rng.random((B, E)) >= p scaled by 1/(1-p); with no layer dropout the
    layer masks are ones and nothing is drawn for them."""
    p_in = 0.4
    with_input = _model("lstm", dropout, p_in, dtype="float32")
    without = _model("lstm", dropout, 0.0, dtype="float32")
    masks = with_input.dropout_masks(np.random.default_rng(7), B)
    ref = np.random.default_rng(7)
    plain = without.dropout_masks(ref, B)
    assert len(masks) == 3
    if dropout:
        for m, m2 in zip(masks[:2], plain, strict=True):
            np.testing.assert_array_equal(m, m2)
    else:
        assert plain is None
        for m in masks[:2]:
            np.testing.assert_array_equal(m, np.ones((B, H), np.float32))
    keep = ref.random((B, E)) >= p_in
    np.testing.assert_array_equal(masks[2], (keep / (1 - p_in)).astype(np.float32))
    assert masks[2].dtype == np.float32


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_each_stream_reads_its_masked_embedding(cell: str) -> None:
    """An independent computation: under input mask m, stream b is the stream of a model
    whose embedding table has its columns scaled by m[b], run alone with the same layer
    masks. Logits, final state, and the embedding gradient summed over streams."""
    model = _model(cell)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    state = [tuple(0.5 * rng.standard_normal(s.shape) for s in layer)
             for layer in model.zero_state(B)]
    masks = model.dropout_masks(np.random.default_rng(2), B)
    assert (masks[2] == 0).any()
    logits, last, _ = model.forward(x, [tuple(s.copy() for s in st) for st in state], masks)
    logits = logits.reshape(T, B, V).copy()
    last = [tuple(s.copy() for s in layer) for layer in last]
    _, grads, _ = model.loss_and_grads(x, y, [tuple(s.copy() for s in st) for st in state], masks)

    demb = np.zeros_like(model.params["embedding.weight"])
    for b in range(B):
        alone = CharRNN(dataclasses.replace(model.shape, input_dropout=0.0),
                        {k: v.copy() for k, v in model.params.items()})
        alone.params["embedding.weight"] *= masks[2][b]  # (V, E) * (E,)
        s_b = [tuple(s[b:b + 1].copy() for s in layer) for layer in state]
        m_b = [m[b:b + 1] for m in masks[:2]]
        lg, lst, _ = alone.forward(x[:, b:b + 1], s_b, m_b)
        np.testing.assert_allclose(logits[:, b], lg, rtol=1e-12, atol=1e-12)
        for layer, ref_layer in zip(last, lst, strict=True):
            for s, r in zip(layer, ref_layer, strict=True):
                np.testing.assert_allclose(s[b:b + 1], r, rtol=1e-12, atol=1e-12)
        # the batch's loss is the mean over T*B; a lone stream's over T
        _, g_b, _ = alone.loss_and_grads(x[:, b:b + 1], y[:, b:b + 1], s_b, m_b)
        demb += g_b["embedding.weight"] * masks[2][b] / B  # chain rule through emb * m[b]
    np.testing.assert_allclose(grads["embedding.weight"], demb, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_an_all_ones_input_mask_is_no_input_dropout(cell: str) -> None:
    """Ones for the input mask give the loss and gradients without it (to rounding: the
    projection is then a GEMM instead of a row gather from the table of V rows)."""
    model = _model(cell)
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    masks = model.dropout_masks(np.random.default_rng(2), B)
    ones = [*masks[:2], np.ones_like(masks[2])]
    loss, grads, _ = model.loss_and_grads(x, y, model.zero_state(B), ones)
    ref_loss, ref_grads, _ = model.loss_and_grads(x, y, model.zero_state(B), masks[:2])
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-10, atol=1e-14, err_msg=k)


def test_evaluation_ignores_input_dropout() -> None:
    """forward() without masks (evaluation, sampling) is that of a model without the option."""
    model = _model("lstm")
    plain = CharRNN(dataclasses.replace(model.shape, input_dropout=0.0),
                    {k: v.copy() for k, v in model.params.items()})
    x = np.random.default_rng(5).integers(0, V, (T, B))
    np.testing.assert_array_equal(model.forward(x, model.zero_state(B))[0].copy(),
                                  plain.forward(x, plain.zero_state(B))[0])


def test_config_refuses_input_dropout_on_one_hot_input() -> None:
    d = {"data": {"path": "x.txt"}, "model": {"embedding_size": 0, "input_dropout": 0.1}}
    with pytest.raises(ConfigError, match="model.input_dropout needs an embedding"):
        config_from_dict(d, "run.yaml")
    with pytest.raises(ConfigError, match="model.input_dropout must be >= 0 and < 1"):
        config_from_dict({"data": {"path": "x.txt"}, "model": {"input_dropout": 1.0}}, "run.yaml")
    assert config_from_dict({"data": {"path": "x.txt"}, "model": {"input_dropout": 0.1}},
                            "run.yaml").model.input_dropout == 0.1
