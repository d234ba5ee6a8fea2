"""`charrnn lab ngram`: interpolated modified Kneser-Ney character n-gram baselines."""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn.cli import cli
from charrnn.config import DataConfig
from charrnn.data import corpus_files, load_corpus
from charrnn.lab.ngram import NGramModel, ngram_baseline, score, stored_baseline

SHAKESPEARE = Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"


def _random_ids(n: int, v: int, seed: int = 0) -> np.ndarray:
    """Ids drawn from a skewed distribution over v symbols (some rare, some unseen)."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(v, 0.3))
    return rng.choice(v, size=n, p=weights).astype(np.uint16)  # (n,)


def _modified_kn_discounts(counts) -> list[float]:
    """[0, D1, D2, D3+] by Chen & Goodman's formula, written out for the test (n1..n4 > 0)."""
    c = Counter(counts)
    n1, n2, n3, n4 = c[1], c[2], c[3], c[4]
    assert min(n1, n2, n3, n4) > 0, "the test corpus must have counts 1..4"
    y = n1 / (n1 + 2 * n2)
    return [0.0, 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3]


# -- counting ------------------------------------------------------------------------


@pytest.mark.parametrize("v", [6, 100_000])  # 100000^8 overflows base-V int64 keys
def test_counts_match_a_naive_dict_count(v):
    ids = _random_ids(3000, 6, seed=1).astype(np.int64) * (v // 6)  # 6 symbols spread over v
    order = 8 if v > 6 else 4
    assert len(np.unique(ids)) >= 4  # not a constant stream
    model = NGramModel.fit(ids, v, order)
    text = ids.tolist()
    for m in range(1, order + 1):
        naive = Counter(tuple(text[i : i + m]) for i in range(len(text) - m + 1))
        grams = [tuple(row) for row in model.grams(m).tolist()]
        assert grams == sorted(naive)  # keys sort lexicographically, no collisions
        level = model.orders[m - 1]
        assert dict(zip(grams, level.raw.counts.tolist())) == dict(naive)
        if m < order:  # continuation count: distinct characters seen before the m-gram
            before: dict[tuple, set] = {}
            for i in range(1, len(text) - m + 1):
                before.setdefault(tuple(text[i : i + m]), set()).add(text[i - 1])
            expected = [len(before.get(g, ())) for g in grams]
            assert level.cont.counts.tolist() == expected


def test_chunked_counting_equals_one_chunk():
    ids = _random_ids(5000, 7, seed=2)
    whole = NGramModel.fit(ids, 9, 5)
    chunked = NGramModel.fit(ids, 9, 5, chunk=97)
    for a, b in zip(whole.orders, chunked.orders):
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.raw.counts, b.raw.counts)
        if a.cont is not None:
            np.testing.assert_array_equal(a.cont.counts, b.cont.counts)
    val = _random_ids(800, 7, seed=3)
    assert [r.val_loss for r in score(whole, ids, val)] == pytest.approx(
        [r.val_loss for r in score(chunked, ids, val, chunk=50)], rel=1e-12)


# -- probabilities -------------------------------------------------------------------


def test_distributions_sum_to_one_at_every_order():
    v = 9  # ids 7 and 8 never occur in training
    model = NGramModel.fit(_random_ids(4000, 7, seed=4), v, 6)
    rng = np.random.default_rng(5)
    for order in range(1, 7):
        for _ in range(30):  # seen, unseen and short contexts alike
            context = rng.integers(0, v, size=int(rng.integers(0, 8))).tolist()
            p = model.distribution(context, order)
            assert p.shape == (v,)
            assert np.all(p > 0)
            assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_stream_scoring_agrees_with_the_distributions():
    """score() uses the training chars before the val tail as context, as distribution()."""
    train, val = _random_ids(3000, 5, seed=6), _random_ids(60, 5, seed=7)
    model = NGramModel.fit(train, 6, 4)
    stream = np.concatenate([train, val]).tolist()
    for r in score(model, train, val, chunk=7):
        nll = [-math.log(model.distribution(stream[:t], r.order)[stream[t]])
               for t in range(len(train), len(stream))]
        assert r.val_loss == pytest.approx(sum(nll) / len(val), rel=1e-12)
        assert r.val_bpc == pytest.approx(r.val_loss / math.log(2), rel=1e-12)


def test_order_one_is_the_smoothed_unigram_cross_entropy():
    v = 12  # ids 10, 11 unseen in training; 6..9 occur exactly 1, 2, 3, 4 times
    train = np.concatenate([_random_ids(2000, 6, seed=8), [6, 7, 7, 8, 8, 8, 9, 9, 9, 9]])
    val = np.array([0, 1, 6, 7, 10, 11, 5, 5, 2, 9])
    c = np.bincount(train, minlength=v)  # (V,)
    d = _modified_kn_discounts(c[c > 0].tolist())
    t = c.sum()
    disc = np.array([d[min(x, 3)] for x in c])  # (V,)
    p = (c - disc) / t + disc.sum() / t / v  # (V,) unigram p with the uniform interpolated
    expected = -np.log(p[val]).mean()
    for order in (1, 5):  # the order-1 row does not depend on the highest order
        got = score(NGramModel.fit(train, v, order), train, val)[0]
        assert got.order == 1
        assert got.val_loss == pytest.approx(expected, rel=1e-12)


def _markov_source(n: int, alphabet: int, seed: int):
    """n chars of an order-2 Markov source (each char depends on the 2 before it), and
    its exact entropy rate in nats/char."""
    rng = np.random.default_rng(seed)
    table = rng.dirichlet(np.full(alphabet, 0.4), size=(alphabet, alphabet))  # (A, A, A)
    cum = np.cumsum(table, axis=-1).tolist()
    u = rng.random(n).tolist()
    x = [0, 1]
    for i in range(2, n):
        x.append(min(bisect.bisect(cum[x[-2]][x[-1]], u[i]), alphabet - 1))
    # the chain on pairs (a, b) -> (b, c) with probability table[a, b, c]
    a = alphabet
    chain = np.zeros((a * a, a * a))  # (A^2, A^2)
    for i in range(a):
        for j in range(a):
            chain[i * a + j, j * a : j * a + a] = table[i, j]
    w, vecs = np.linalg.eig(chain.T)
    pi = np.real(vecs[:, np.argmin(np.abs(w - 1))])
    pi /= pi.sum()  # (A^2,) stationary distribution of pairs
    h_pair = -(table * np.log(table)).sum(axis=-1).reshape(-1)  # (A^2,) entropy per context
    return np.array(x, dtype=np.uint8), float(pi @ h_pair), table


def test_order_k_markov_source_reaches_its_entropy_rate():
    ids, rate, table = _markov_source(300_000, 3, seed=9)
    n_val = 30_000
    train, val = ids[:-n_val], ids[-n_val:]
    losses = {r.order: r.val_loss for r in score(NGramModel.fit(train, 3, 5), train, val)}
    # the source's own loss on this val tail: the sampling error of the comparison
    true_loss = -np.log(table[val[:-2], val[1:-1], val[2:]]).mean()
    assert abs(true_loss - rate) < 0.02
    assert losses[3] == pytest.approx(true_loss, abs=0.003)  # 2 chars of context = the source's
    assert losses[3] == pytest.approx(rate, abs=0.02)
    assert losses[4] > losses[3] - 0.002 and losses[5] > losses[3] - 0.002  # nothing more to learn
    assert losses[2] > losses[3] + 0.02 and losses[1] > losses[2]


# -- the corpus split and the CLI ----------------------------------------------------


def test_baseline_scores_trainings_validation_split(corpus_path):
    r = ngram_baseline(str(corpus_path), order=3, val_fraction=0.1, test_fraction=0.05)
    cfg = DataConfig(path=str(corpus_path), val_fraction=0.1, test_fraction=0.05)
    corpus = load_corpus(cfg)
    assert (r.train_chars, r.val_chars) == (len(corpus.train), len(corpus.val))
    model = NGramModel.fit(corpus.train, corpus.vocab.size, 3)
    assert [o.val_loss for o in r.orders] == [o.val_loss for o in score(model, corpus.train,
                                                                         corpus.val)]
    stored = stored_baseline(corpus_files(str(corpus_path)), cfg)
    assert stored["best"]["val_loss"] == r.best.val_loss
    other = DataConfig(path=str(corpus_path), val_fraction=0.2)
    assert stored_baseline(corpus_files(str(corpus_path)), other) is None


def test_cli_json(corpus_path):
    res = CliRunner().invoke(cli, ["lab", "ngram", "--text", str(corpus_path), "--order", "4",
                                   "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert {"orders", "best"} <= set(d)
    assert [o["order"] for o in d["orders"]] == [1, 2, 3, 4]
    for o in [*d["orders"], d["best"]]:
        assert set(o) == {"order", "val_loss", "val_bpc"}
        assert o["val_bpc"] == pytest.approx(o["val_loss"] / math.log(2))
    assert d["best"] == min(d["orders"], key=lambda o: o["val_loss"])
    table = CliRunner().invoke(cli, ["lab", "ngram", "--text", str(corpus_path), "--order", "2"])
    assert table.exit_code == 0 and "perplexity" in table.output and "best: order" in table.output


@pytest.mark.parametrize("case", ["missing", "empty", "no_val", "order0", "fraction"])
def test_cli_bad_input_is_one_line_exit_2(case, tmp_path, corpus_path):
    text, extra = str(corpus_path), []
    if case == "missing":
        text = str(tmp_path / "nope.txt")
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        text = str(tmp_path / "empty.txt")
    elif case == "no_val":
        (tmp_path / "short.txt").write_text("hello world\n")
        extra = ["--val-fraction", "0.01"]
        text = str(tmp_path / "short.txt")
    elif case == "order0":
        extra = ["--order", "0"]
    else:
        extra = ["--val-fraction", "1.5"]
    res = CliRunner().invoke(cli, ["lab", "ngram", "--text", text, *extra])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output


def test_training_summary_prints_the_stored_baseline(corpus_path, tmp_path, config_dict,
                                                     write_config):
    runner = CliRunner()
    config = write_config(config_dict(corpus_path, tmp_path / "run"))
    assert runner.invoke(cli, ["train", "--config", str(config)]).exit_code == 0
    res = runner.invoke(cli, ["lab", "ngram", "--text", str(corpus_path), "--order", "3",
                              "--val-fraction", "0.1", "--json"])
    best = json.loads(res.output)["best"]
    res = runner.invoke(cli, ["train", "--config", str(config), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert f"n-gram baseline (order {best['order']}, KN" in res.output
    assert f"{best['val_loss']:.4f} nats/char" in res.output


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tiny-shakespeare is not in shared/data")
def test_tiny_shakespeare_order_5_beats_2_nats():
    r = ngram_baseline(str(SHAKESPEARE), order=5, val_fraction=0.05, store=False)
    losses = [o.val_loss for o in r.orders]
    assert losses == sorted(losses, reverse=True)  # up to order 5 each order helps
    assert losses[0] == pytest.approx(3.361, abs=0.01)  # the unigram entropy
    assert losses[4] < 2.0
