"""Sampling: temperature, top-k, top-p, the frequencies they produce, priming and batching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import charrnn.sample as sample_mod
from charrnn.errors import VocabError
from charrnn.model import CharRNN, ModelShape
from charrnn.sample import draw, encode_seed, generate, next_char_probs, sample_text
from charrnn.vocab import Vocab

VOCAB = Vocab(list(" abcdefghij"))
V = VOCAB.size


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture
def model() -> CharRNN:
    shape = ModelShape("lstm", V, hidden_size=12, num_layers=2, embedding_size=6)
    m = CharRNN.create(shape, seed=11, dtype="float64")
    rng = np.random.default_rng(12)
    for p in m.params.values():  # a model with opinions: varied, history-dependent outputs
        p += 0.4 * rng.standard_normal(p.shape)
    return m


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing drawn where the probability is zero
    return float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))


# chi-square quantiles at 0.999: dof -> value (the draws are seeded, so this is a fixed check)
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32, 9: 27.88, 10: 29.59}


# -- next_char_probs / draw ------------------------------------------------------------------


def test_temperature_zero_is_argmax() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, V)) * 3
    for top_k, top_p in ((0, 1.0), (3, 1.0), (0, 0.5)):
        ids = draw(logits, rng, 0.0, top_k, top_p)
        np.testing.assert_array_equal(ids, logits.argmax(axis=1))
    # and it never consumes randomness
    state = rng.bit_generator.state
    draw(logits, rng, 0.0, 0, 1.0)
    assert rng.bit_generator.state == state


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_probs_are_the_tempered_softmax(temperature) -> None:
    logits = np.random.default_rng(1).standard_normal((4, V)) * 2
    logits32 = logits.astype(np.float32)
    p = next_char_probs(logits32, temperature)
    assert p.dtype == np.float64
    # computed in float64 from the float32 logits: to rounding (float32 would be 1e-7)
    np.testing.assert_allclose(p, softmax(logits32.astype(np.float64) / temperature),
                               rtol=1e-12)
    np.testing.assert_allclose(p, softmax(logits / temperature), rtol=1e-5)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_low_temperature_sharpens_high_temperature_flattens() -> None:
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    entropy = [float(-(p * np.log(p)).sum()) for p in
               (next_char_probs(logits, t)[0] for t in (0.1, 0.5, 1.0, 2.0, 10.0))]
    assert entropy == sorted(entropy)
    assert next_char_probs(logits, 0.05)[0, 0] > 0.99
    assert next_char_probs(logits, 100.0)[0] == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_never_leaves_the_k_most_likely(k) -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((8, V))  # (B, V), distinct values
    allowed = np.argsort(-logits, axis=1)[:, :k]  # (B, k)
    p = next_char_probs(logits, 1.0, top_k=k)
    for b in range(len(logits)):
        assert set(np.flatnonzero(p[b])) == set(allowed[b])
        np.testing.assert_allclose(p[b, allowed[b]], softmax(logits[b, allowed[b]]))
    for _ in range(500):  # 4000 draws
        ids = draw(logits, rng, 1.5, k, 1.0)
        assert all(ids[b] in allowed[b] for b in range(len(ids)))


def test_top_k_of_at_least_v_changes_nothing() -> None:
    logits = np.random.default_rng(3).standard_normal((2, V))
    for k in (0, V, V + 5):
        np.testing.assert_allclose(next_char_probs(logits, 1.0, top_k=k), softmax(logits))


def test_top_p_worked_example() -> None:
    logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]]))
    np.testing.assert_allclose(next_char_probs(logits, 1.0, top_p=0.45), [[0, 1, 0, 0]])
    np.testing.assert_allclose(next_char_probs(logits, 1.0, top_p=0.5), [[0, 1, 0, 0]])
    np.testing.assert_allclose(next_char_probs(logits, 1.0, top_p=0.7),
                               [[0, 0.5 / 0.8, 0, 0.3 / 0.8]])
    np.testing.assert_allclose(next_char_probs(logits, 1.0, top_p=0.9),
                               [[0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]])
    np.testing.assert_allclose(next_char_probs(logits, 1.0, top_p=0.99), softmax(logits))


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    top_p=st.floats(0.01, 0.999),
    temperature=st.floats(0.2, 3.0),
)
def test_top_p_keeps_the_smallest_nucleus(seed, top_p, temperature) -> None:
    logits = np.random.default_rng(seed).standard_normal((3, V)) * 2
    full = softmax(logits / temperature)
    p = next_char_probs(logits, temperature, top_p=top_p)
    for b in range(3):
        kept = np.flatnonzero(p[b])
        order = np.argsort(-full[b], kind="stable")
        assert set(kept) == set(order[: len(kept)])  # the most likely ones
        mass = full[b, kept].sum()
        assert mass >= top_p - 1e-12  # enough mass ...
        assert mass - full[b, kept].min() < top_p + 1e-12  # ... and no character to spare
        np.testing.assert_allclose(p[b, kept], full[b, kept] / mass, rtol=1e-9)


def test_top_k_and_top_p_together() -> None:
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    # top-k=3 leaves [4/9, 3/9, 2/9]; top-p=0.7 then keeps the first two (4/9 < 0.7 <= 7/9)
    np.testing.assert_allclose(next_char_probs(logits, 1.0, top_k=3, top_p=0.7),
                               [[4 / 7, 3 / 7, 0, 0]])


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0), (1.3, 0, 0.8)]
)
def test_draw_frequencies_match_the_probabilities(temperature, top_k, top_p) -> None:
    n = 20_000
    logits = np.array([1.5, 0.2, -0.4, 0.9, -1.0, 0.0, 0.5, -2.0])  # (V,)
    probs = next_char_probs(logits[None], temperature, top_k, top_p)[0]
    rng = np.random.default_rng(4)
    ids = draw(np.tile(logits, (n, 1)), rng, temperature, top_k, top_p)  # n rows, one batch
    counts = np.bincount(ids, minlength=len(logits))
    dof = int((probs > 0).sum()) - 1
    assert chi_square(counts, probs) < CHI2_999[dof]
    if temperature == 1.0 and top_k == 0 and top_p == 1.0:
        np.testing.assert_allclose(probs, softmax(logits))


def test_draw_frequencies_over_successive_calls() -> None:
    """Many calls of a single row (the way one stream samples) also follow the softmax."""
    logits = np.array([[0.0, 1.0, 2.0, 0.5]])
    rng = np.random.default_rng(5)
    counts = np.zeros(4, dtype=np.int64)
    for _ in range(20_000):
        counts[draw(logits, rng, 1.0, 0, 1.0)[0]] += 1
    assert chi_square(counts, softmax(logits[0])) < CHI2_999[3]


def test_draw_is_reproducible() -> None:
    logits = np.random.default_rng(6).standard_normal((5, V))
    a = [draw(logits, np.random.default_rng(9), 1.0, 0, 1.0) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    assert draw(logits, np.random.default_rng(9), 1.0, 0, 1.0).shape == (5,)


# -- generate / sample_text ------------------------------------------------------------------


def test_same_rng_seed_same_text(model) -> None:
    kw = dict(temperature=1.0, rng_seed=1234)
    a = sample_text(model, VOCAB, "abc", 200, **kw)
    b = sample_text(model, VOCAB, "abc", 200, **kw)
    assert a == b
    c = sample_text(model, VOCAB, "abc", 200, temperature=1.0, rng_seed=1235)
    assert c != a
    assert len(a) == 1 and a[0].startswith("abc") and len(a[0]) == 203
    assert set(a[0]) <= set(VOCAB.chars)


def test_length_zero_is_the_seed(model) -> None:
    assert sample_text(model, VOCAB, "hij", 0, rng_seed=1) == ["hij"]


def test_greedy_generation_is_the_manual_argmax_loop(model) -> None:
    seed_ids = encode_seed(VOCAB, "a bad cafe")
    got = np.array([ids[0] for ids in generate(model, seed_ids, 30, temperature=0.0)])
    state = model.zero_state(1)
    for i in seed_ids:
        logits, state = model.step(np.array([i]), state)
    expected = []
    for _ in range(30):
        nxt = int(logits.argmax(axis=1)[0])
        expected.append(nxt)
        logits, state = model.step(np.array([nxt]), state)
    np.testing.assert_array_equal(got, expected)


def test_seed_priming_equals_forwarding_the_seed(model, monkeypatch) -> None:
    """The distribution of the first generated character is the model's prediction after
    the seed, computed one step at a time."""
    seen: list[np.ndarray] = []
    real_draw = sample_mod.draw

    def spy(logits, *args, **kwargs):
        seen.append(np.array(logits, copy=True))
        return real_draw(logits, *args, **kwargs)

    monkeypatch.setattr(sample_mod, "draw", spy)
    seed = "jig head"
    out = sample_text(model, VOCAB, seed, 5, rng_seed=3, num_samples=2)
    state = model.zero_state(1)
    for ch in seed:
        logits, state = model.step(np.array([VOCAB.stoi[ch]]), state)
    first = seen[0]
    assert first.shape == (2, V)
    for row in first:
        np.testing.assert_allclose(row, logits[0], rtol=1e-10, atol=1e-12)
    # and each later step's logits follow from the characters actually drawn
    for b, text in enumerate(out):
        st_ = [tuple(s.copy() for s in layer) for layer in state]
        for t, ch in enumerate(text[len(seed):-1]):
            lg, st_ = model.step(np.array([VOCAB.stoi[ch]]), st_)
            np.testing.assert_allclose(seen[t + 1][b], lg[0], rtol=1e-10, atol=1e-12)


def test_empty_seed_starts_from_the_zero_state(model, monkeypatch) -> None:
    seen = []
    real_draw = sample_mod.draw
    monkeypatch.setattr(sample_mod, "draw",
                        lambda logits, *a, **k: seen.append(np.array(logits)) or real_draw(
                            logits, *a, **k))
    out = sample_text(model, VOCAB, "", 10, rng_seed=0)
    assert len(out[0]) == 10
    np.testing.assert_allclose(seen[0][0], model.params["head.bias"])


def test_num_samples_are_drawn_as_one_batch(model, monkeypatch) -> None:
    calls: list[tuple[int, ...]] = []
    real_draw = sample_mod.draw

    def spy(logits, *args, **kwargs):
        calls.append(logits.shape)
        return real_draw(logits, *args, **kwargs)

    monkeypatch.setattr(sample_mod, "draw", spy)
    per_step: list[list[str]] = []
    texts = sample_text(model, VOCAB, "ab", 40, num_samples=3, rng_seed=7,
                        on_chars=per_step.append)
    assert len(texts) == 3
    assert all(t.startswith("ab") and len(t) == 42 for t in texts)
    assert len(set(texts)) == 3  # independent draws
    assert len(per_step) == 40 and all(len(c) == 3 for c in per_step)
    assert ["".join(c[b] for c in per_step) for b in range(3)] == [t[2:] for t in texts]
    # one batched draw per generated character, never one per stream
    assert calls == [(3, V)] * 40
    ids = list(generate(model, encode_seed(VOCAB, "ab"), 4, num_samples=3,
                        rng=np.random.default_rng(0)))
    assert [i.shape for i in ids] == [(3,)] * 4


def test_greedy_samples_are_identical(model) -> None:
    texts = sample_text(model, VOCAB, "ace", 50, temperature=0.0, num_samples=3)
    assert texts[0] == texts[1] == texts[2]
    assert texts[:1] == sample_text(model, VOCAB, "ace", 50, temperature=0.0)


def test_unknown_seed_characters(model) -> None:
    with pytest.raises(VocabError, match="☃") as err:
        sample_text(model, VOCAB, "ab☃c", 10, rng_seed=1)
    assert err.value.exit_code == 2
    with pytest.raises(VocabError, match="skip-unknown"):
        encode_seed(VOCAB, "Z")
    skipped = sample_text(model, VOCAB, "ab☃cZ", 30, rng_seed=1, skip_unknown=True)
    clean = sample_text(model, VOCAB, "abc", 30, rng_seed=1)
    assert skipped[0].startswith("ab☃cZ")  # the seed is echoed as given
    assert skipped[0][len("ab☃cZ"):] == clean[0][3:]  # generated as if it were "abc"
    np.testing.assert_array_equal(encode_seed(VOCAB, "a☃b", skip_unknown=True),
                                  [VOCAB.stoi["a"], VOCAB.stoi["b"]])


@pytest.mark.parametrize("how", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.0, 0, 1.0)])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_generation_in_groups_equals_one_group(cell, how, both_paths, monkeypatch) -> None:
    """A batch big enough for threads: each thread's group of streams makes GROUP_STEPS
    steps on its own between hand-offs, with the uniform numbers drawn ahead for all. The
    characters are the one-group loop's bit for bit, at every chunk boundary, and the
    generator ends in the same state."""
    import charrnn.model

    shape = ModelShape(cell, V, hidden_size=20, num_layers=2, embedding_size=5)
    m = CharRNN.create(shape, seed=2)
    rng = np.random.default_rng(3)
    for p in m.params.values():
        p += (0.4 * rng.standard_normal(p.shape)).astype(p.dtype)
    monkeypatch.setattr(sample_mod, "GROUP_STEPS", 16)  # 75 steps: 4 chunks and a part
    monkeypatch.setenv("CHARRNN_THREADS", "2")
    temperature, top_k, top_p = how

    def run(split: bool) -> tuple[np.ndarray, float]:
        monkeypatch.setattr(charrnn.model, "PARALLEL_FLOPS", 0 if split else float("inf"))
        assert len(m.stepper().groups(6)) == (2 if split else 1)
        gen = np.random.default_rng(7)
        ids = list(generate(m, np.array([1, 2, 3]), 75, temperature=temperature, top_k=top_k,
                            top_p=top_p, num_samples=6, rng=gen))
        return np.stack(ids), gen.random()

    grouped, after_grouped = run(True)
    serial, after_serial = run(False)
    assert grouped.shape == (75, 6)
    np.testing.assert_array_equal(grouped, serial)
    assert after_grouped == after_serial
    assert len(np.unique(grouped[:, 0])) > 1  # a real sample, not one repeated character


@pytest.mark.parametrize("streams, split", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_stepper_equals_the_model_step(cell, dtype, tol, streams, split, both_paths,
                                       monkeypatch) -> None:
    """The generation fast path (weights pre-arranged, one kernel call per layer, the packed
    GEMM for several streams, the streams split over threads for a big step) against
    CharRNN.step, a one-step window, over several steps."""
    import charrnn.model

    if split:
        monkeypatch.setattr(charrnn.model, "PARALLEL_FLOPS", 0)
        monkeypatch.setenv("CHARRNN_THREADS", "2")
    shape = ModelShape(cell, V, hidden_size=20, num_layers=2, embedding_size=5)
    m = CharRNN.create(shape, seed=2, dtype=dtype)
    rng = np.random.default_rng(3)
    for p in m.params.values():
        p += (0.4 * rng.standard_normal(p.shape)).astype(dtype)
    stepper = m.stepper()
    state_s = state_m = m.zero_state(streams)
    for ids in rng.integers(0, V, (6, streams)):
        given = state_s
        kept = [tuple(s.copy() for s in layer) for layer in given]
        logits_s, state_s = stepper.step(ids, given)
        logits_m, state_m = m.step(ids, state_m)
        np.testing.assert_allclose(logits_s, logits_m, rtol=tol, atol=tol)
        for a, b in zip(state_s, state_m, strict=True):
            for s, t in zip(a, b, strict=True):
                assert s.dtype == np.dtype(dtype)
                np.testing.assert_allclose(s, t, rtol=tol, atol=tol)
        for a, b in zip(given, kept, strict=True):  # the state passed in is left as it was
            for s, t in zip(a, b, strict=True):
                np.testing.assert_array_equal(s, t)
