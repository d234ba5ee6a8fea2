"""`charrnn inspect gradients`: grad_norm and jacobian_norm against PyTorch autograd and
float64 finite differences, the seeds' theory (the bound, growth, the worked example), the
windows, the CONTRACT JSON and the command line."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn.checkpoint import save_checkpoint
from charrnn.cli import cli
from charrnn.config import config_from_dict
from charrnn.errors import DataError
from charrnn.inspect.equations import (
    STEP,
    LayerWeights,
    PlainModel,
    num_states,
    rnn_step,
    step_jacobian,
)
from charrnn.inspect.gradients import (
    effective_horizon,
    gradient_flow,
    largest_singular_values,
    window_starts,
)
from charrnn.model import CharRNN, ModelShape
from charrnn.vocab import Vocab

FIXTURES = Path(__file__).parent / "fixtures"
CELLS = ("rnn", "lstm", "gru")


def perturbed_params(cell: str, V: int, H: int, L: int, E: int, seed: int = 0,
                     scale: float = 0.4) -> dict[str, np.ndarray]:
    """A float64 model's parameters with every tensor moved off its initialisation."""
    model = CharRNN.create(ModelShape(cell, V, H, L, E), seed, "float64")
    rng = np.random.default_rng(seed + 1)
    for w in model.params.values():
        w += scale * rng.standard_normal(w.shape)
    return model.params


# -- against PyTorch autograd (scripts/make_inspect_fixtures.py) ------------------------


@pytest.mark.parametrize("name", [f"inspect_{c}_{e}" for c in CELLS for e in ("emb", "onehot")])
def test_matches_torch_autograd(name):
    z = np.load(FIXTURES / f"{name}.npz")
    params = {k[len("param."):]: z[k] for k in z.files if k.startswith("param.")}
    flow = gradient_flow(params, str(z["cell"]), z["ids"], int(z["max_lag"]), int(z["windows"]),
                         int(z["prime"]))
    grad = np.array([f.grad_norm for f in flow.layers])  # (L, K+1)
    jac = np.array([f.jacobian_norm for f in flow.layers])
    np.testing.assert_allclose(grad, z["grad_norm"], rtol=1e-11, atol=0)
    np.testing.assert_allclose(jac, z["jacobian_norm"], rtol=1e-11, atol=0)
    assert np.all(jac[:, 0] == 1.0)


# -- against finite differences of the forward pass alone -------------------------------


def forward_from(plain: PlainModel, text: np.ndarray, P: int, K: int,
                 layer: int | None = None, step: int | None = None,
                 delta: np.ndarray | None = None):
    """Last-step losses (B,) of windows text (P+K+2, B), with `delta` (B, H) added to
    h_layer(step) as it is computed; also every layer's input at every step, (K+1, B, I).
    Uses only the cells' forward steps."""
    B = text.shape[1]
    state = plain.zero_state(B)
    inputs = plain.embed(text)  # (P+K+2, B, I)
    seen: list[list[np.ndarray]] = [[] for _ in plain.layers]
    for t in range(P + K + 1):
        x = inputs[t]
        for k, w in enumerate(plain.layers):
            a = x @ w.W_ih.T + w.b_ih
            if t >= P:
                seen[k].append(x)
            state[k], _ = STEP[w.cell](a, state[k], w)
            if delta is not None and k == layer and t == P + step:
                state[k] = (state[k][0] + delta, *state[k][1:])
            x = state[k][0]
    logits = x @ plain.head_W.T + plain.head_b  # (B, V)
    m = logits.max(axis=1)
    lse = np.log(np.exp(logits - m[:, None]).sum(axis=1)) + m
    return lse - logits[np.arange(B), text[P + K + 1]], [np.stack(s) for s in seen]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("E", [3, 0])
def test_matches_finite_differences(cell, E):
    V, H, L, K, N, P = 5, 4, 2, 5, 2, 4
    params = perturbed_params(cell, V, H, L, E, seed=7)
    ids = np.random.default_rng(3).integers(0, V, 40)
    flow = gradient_flow(params, cell, ids, K, N, P)
    plain = PlainModel.from_params(params, cell)
    starts = window_starts(len(ids), K, N, P)
    text = ids[starts[None, :] + np.arange(P + K + 2)[:, None]]  # (P+K+2, N)
    _, seen = forward_from(plain, text, P, K)
    eps = 1e-6
    for layer in range(L):
        fd_grad = []
        for lag in range(K + 1):
            g = np.zeros((N, H))
            for j in range(H):
                d = np.zeros((N, H))
                d[:, j] = eps
                up, _ = forward_from(plain, text, P, K, layer, K - lag, d)
                down, _ = forward_from(plain, text, P, K, layer, K - lag, -d)
                g[:, j] = (up - down) / (2 * eps)
            fd_grad.append(np.linalg.norm(g, axis=1).mean())
        np.testing.assert_allclose(flow.layers[layer].grad_norm, fd_grad, rtol=1e-6)

        # the k-step map of layer `layer`'s state with its inputs held fixed
        w = plain.layers[layer]
        S = num_states(cell) * H
        _, caches_state = _states(plain, text, P, K, layer)
        for lag in (1, 2, K):
            sig = []
            for i in range(N):
                def run(flat, i=i, lag=lag, w=w, layer=layer):
                    st = tuple(flat[None, j * H:(j + 1) * H] for j in range(num_states(cell)))
                    for s in range(K - lag + 1, K + 1):
                        a = seen[layer][s][i:i + 1] @ w.W_ih.T + w.b_ih
                        st, _ = STEP[cell](a, st, w)
                    return np.concatenate(st, axis=1)[0]
                s0 = caches_state[K - lag][i]
                J = np.stack([(run(s0 + eps * e) - run(s0 - eps * e)) / (2 * eps)
                              for e in np.eye(S)], axis=1)  # (S, S)
                sig.append(np.linalg.norm(J, 2))
            assert flow.layers[layer].jacobian_norm[lag] == pytest.approx(np.mean(sig), rel=1e-6)


def _states(plain: PlainModel, text: np.ndarray, P: int, K: int, layer: int):
    """The full state (h[, c]) of `layer` after each of the K+1 steps, (K+1, B, S)."""
    B = text.shape[1]
    state = plain.zero_state(B)
    inputs = plain.embed(text)
    out = []
    for t in range(P + K + 1):
        x = inputs[t]
        for k, w in enumerate(plain.layers):
            state[k], _ = STEP[w.cell](x @ w.W_ih.T + w.b_ih, state[k], w)
            x = state[k][0]
        if t >= P:
            out.append(np.concatenate(state[layer], axis=1))
    return None, np.stack(out)


def test_plain_equations_match_the_production_forward():
    """The inspector's plain cells compute what CharRNN.forward (tuned or compiled) does."""
    for cell in CELLS:
        for E in (3, 0):
            params = perturbed_params(cell, 6, 5, 2, E, seed=11)
            model = CharRNN(ModelShape(cell, 6, 5, 2, E), params)
            x = np.random.default_rng(0).integers(0, 6, (9, 3))
            logits, state, _ = model.forward(x, model.zero_state(3))
            plain = PlainModel.from_params(params, cell)
            plain_logits, _, plain_state = plain.forward(x, plain.zero_state(3))
            np.testing.assert_allclose(plain_logits.reshape(-1, 6), logits, rtol=0, atol=1e-12)
            for a, b in zip(state, plain_state):
                for u, v in zip(a, b):
                    np.testing.assert_allclose(u, v, rtol=0, atol=1e-12)


# -- the seeds' theory -------------------------------------------------------------------


def rnn_params(sigma: float, input_scale: float, H: int = 8, V: int = 5, seed: int = 2):
    """A 1-layer tanh RNN whose W_hh is orthogonal times `sigma` (so sigma_max = sigma)."""
    params = CharRNN.create(ModelShape("rnn", V, H, 1, 4), seed, "float64").params
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((H, H)))
    params["rnn.weight_hh_l0"][...] = sigma * q
    params["rnn.weight_ih_l0"] *= input_scale
    return params


def test_contracting_rnn_never_exceeds_the_bound():
    params = rnn_params(0.5, 1.0)
    ids = np.random.default_rng(0).integers(0, 5, 300)
    flow = gradient_flow(params, "rnn", ids, max_lag=30, windows=4, prime=10)
    (layer,) = flow.layers
    assert layer.weights["h"]["sigma_max"] == pytest.approx(0.5, rel=1e-12)
    for k, j in enumerate(layer.jacobian_norm):
        assert j <= 0.5**k * (1 + 1e-12), (k, j)
    assert layer.bound("rnn")[10] == pytest.approx(0.5**10)
    # tanh' < 1 on real inputs: strictly inside the bound after a few steps
    assert layer.jacobian_norm[10] < 0.9 * 0.5**10


def test_expanding_rnn_with_small_inputs_grows():
    params = rnn_params(1.5, 1e-3)
    params["embedding.weight"] *= 1e-3
    ids = np.random.default_rng(0).integers(0, 5, 300)
    flow = gradient_flow(params, "rnn", ids, max_lag=12, windows=4, prime=0)
    jac = flow.layers[0].jacobian_norm
    # near the zero state tanh' ~ 1, so the norm follows 1.5^k closely, then saturation bends it
    assert jac[1] == pytest.approx(1.5, rel=1e-3)
    assert jac[6] > 1.5**6 * 0.9
    assert all(b > a for a, b in zip(jac[:7], jac[1:8]))


def worked_example():
    """The seeds' example: W_hh = [[0.5, 0.1], [0.1, 0.5]], W_xh = [[0.2], [0.3]], x = [1, 2],
    zero biases and initial state; the step Jacobian at step 2 and path 1 of
    dy_2/dW_xh[0,0] (the path through h_1: J_2 dh_1/dW_xh[0,0], summed over y_2 = h_2)."""
    w = LayerWeights("rnn", np.array([[0.2], [0.3]]), np.array([[0.5, 0.1], [0.1, 0.5]]),
                     np.zeros(2), np.zeros(2))
    x = np.array([[1.0], [2.0]])  # (T, I)
    (h1,), _ = rnn_step((x[0] @ w.W_ih.T)[None], (np.zeros((1, 2)),), w)
    _, cache2 = rnn_step((x[1] @ w.W_ih.T)[None], (h1,), w)
    J2 = step_jacobian(cache2, w)[0]  # (2, 2)
    dh1 = np.array([(1 - h1[0, 0] ** 2) * x[0, 0], 0.0])  # d h_1 / d W_xh[0,0]
    return J2, float((J2 @ dh1).sum())


def test_worked_example_exact():
    J2, path1 = worked_example()
    np.testing.assert_allclose(J2, [[0.38301, 0.07660], [0.05850, 0.29248]], atol=6e-6)
    assert path1 == pytest.approx(0.42431, abs=6e-6)
    # exact arithmetic, independently: tanh'(z_2) times the rows of W_hh
    h1 = np.tanh([0.2, 0.3])
    z2 = np.array([[0.5, 0.1], [0.1, 0.5]]) @ h1 + 2 * np.array([0.2, 0.3])
    np.testing.assert_allclose(J2, (1 - np.tanh(z2) ** 2)[:, None] * [[0.5, 0.1], [0.1, 0.5]],
                               rtol=1e-14)


def test_worked_example_quoted_values():
    """The seeds quote values from rounded intermediates: they agree to 1e-3."""
    J2, path1 = worked_example()
    np.testing.assert_allclose(J2, [[0.3833, 0.0767], [0.0586, 0.2928]], atol=1e-3)
    assert path1 == pytest.approx(0.4247, abs=1e-3)


# -- windows, horizon, the singular values ----------------------------------------------


def test_window_starts_follow_the_contract():
    n, K, N, P = 1000, 100, 16, 200
    a = window_starts(n, K, N, P)
    assert a.tolist() == [math.floor(i * (n - (P + K + 2)) / (N - 1)) for i in range(N)]
    assert a[0] == 0 and a[-1] + P + K + 2 == n
    assert window_starts(P + K + 2, K, 1, P).tolist() == [0]


def test_short_text_names_what_fits():
    with pytest.raises(DataError) as e:
        window_starts(150, 100, 16, 200)
    msg = str(e.value)
    assert "302" in msg and "--prime 48" in msg and "--max-lag" not in msg
    with pytest.raises(DataError, match="--max-lag 8 or --prime 38"):
        window_starts(140, 100, 16, 130)


def test_effective_horizon():
    assert effective_horizon([2.0, 1.0, 0.01, 0.0019, 0.5]) == 3
    assert effective_horizon([1.0, 0.5, 0.1]) is None


def test_block_power_iteration_matches_svd():
    rng = np.random.default_rng(5)
    P = rng.standard_normal((3, 96, 96)) @ np.diag(np.linspace(0.1, 1.0, 96))
    exact = np.linalg.svd(P, compute_uv=False)[:, 0]
    sigma, U = largest_singular_values(P, exact_max_dim=0)
    np.testing.assert_allclose(sigma, exact, rtol=1e-9)
    # a warm start from the returned block converges to the same
    sigma2, _ = largest_singular_values(P * 1.01, U, exact_max_dim=0)
    np.testing.assert_allclose(sigma2, exact * 1.01, rtol=1e-9)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_power_iteration_path_agrees_with_exact_path(cell):
    params = perturbed_params(cell, 6, 40, 1, 3, seed=1, scale=0.2)
    ids = np.random.default_rng(0).integers(0, 6, 200)
    exact = gradient_flow(params, cell, ids, 10, 3, 5, exact_max_dim=10_000)
    power = gradient_flow(params, cell, ids, 10, 3, 5, exact_max_dim=0)
    np.testing.assert_allclose(power.layers[0].jacobian_norm, exact.layers[0].jacobian_norm,
                               rtol=1e-8)


def test_thread_split_changes_nothing(monkeypatch):
    params = perturbed_params("lstm", 6, 8, 2, 3, seed=4)
    ids = np.random.default_rng(0).integers(0, 6, 300)
    monkeypatch.setenv("CHARRNN_THREADS", "1")
    one = gradient_flow(params, "lstm", ids, 12, 5, 7).to_json()
    monkeypatch.setenv("CHARRNN_THREADS", "3")
    three = gradient_flow(params, "lstm", ids, 12, 5, 7).to_json()
    for a, b in zip(one["layers"], three["layers"]):
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-12)
        np.testing.assert_allclose(a["jacobian_norm"], b["jacobian_norm"], rtol=1e-12)


def test_weight_spectra_per_gate():
    params = perturbed_params("gru", 6, 5, 1, 3, seed=2)
    flow = gradient_flow(params, "gru", np.arange(60) % 6, 3, 2, 2)
    W = params["rnn.weight_hh_l0"]
    for j, gate in enumerate("rzn"):
        block = W[j * 5:(j + 1) * 5]
        got = flow.layers[0].weights[gate]
        assert got["sigma_max"] == pytest.approx(np.linalg.svd(block, compute_uv=False)[0])
        assert got["spectral_radius"] == pytest.approx(np.abs(np.linalg.eigvals(block)).max())


# -- the command line ----------------------------------------------------------------------


TEXT = "".join(f"{w} (the cat) sat on 'a mat', and then it ran.\n" for w in
               ("Then", "So", "And", "But") * 20)


@pytest.fixture
def checkpoint(tmp_path, request) -> Path:
    cell = getattr(request, "param", "lstm")
    vocab = Vocab.build([TEXT])
    params = perturbed_params(cell, vocab.size, 6, 2, 4, seed=3, scale=0.1)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    cfg = config_from_dict({
        "data": {"path": str(tmp_path / "corpus.txt")},
        "model": {"cell": cell, "hidden_size": 6, "num_layers": 2, "embedding_size": 4},
    })
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, params, config=cfg, vocab=vocab, step=1)
    (tmp_path / "text.txt").write_text(TEXT + "☃☃", encoding="utf-8")
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, ["inspect", "gradients", *args], catch_exceptions=False)


@pytest.mark.parametrize("checkpoint", CELLS, indirect=True)
def test_cli_json_follows_the_contract(checkpoint):
    text = checkpoint.parent / "text.txt"
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    r = invoke("--checkpoint", str(checkpoint), "--text", str(text), "--max-lag", "30",
               "--windows", "3", "--prime", "20", "--json")
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    cell = j["cell"]
    assert (j["max_lag"], j["windows"], j["prime"]) == (30, 3, 20)
    assert [layer["layer"] for layer in j["layers"]] == [0, 1]
    gates = {"rnn": {"h"}, "lstm": set("ifgo"), "gru": set("rzn")}[cell]
    for layer in j["layers"]:
        assert layer["lag"] == list(range(31))
        assert len(layer["grad_norm"]) == len(layer["jacobian_norm"]) == 31
        assert layer["jacobian_norm"][0] == 1.0
        assert set(layer["weights"]) == gates
        assert all(set(v) == {"spectral_radius", "sigma_max"} for v in layer["weights"].values())
    assert "2 character(s) outside the vocabulary" in r.stderr
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before


def test_cli_table(checkpoint):
    r = invoke("--checkpoint", str(checkpoint), "--text", str(checkpoint.parent / "text.txt"),
               "--max-lag", "20", "--windows", "2", "--prime", "5")
    assert r.exit_code == 0, r.output
    assert "effective horizon" in r.stdout and "layer 1" in r.stdout
    assert "diag(f)" in r.stdout  # why the seeds' bound does not apply to the lstm
    rows = [line.split()[0] for line in r.stdout.splitlines() if line[:7].strip().isdigit()]
    assert rows == ["0", "1", "2", "4", "6", "8", "10", "12", "14", "16", "18", "20"] * 2


@pytest.mark.parametrize("args, names", [
    (["--max-lag", "5000"], ["5202", "--max-lag"]),
    (["--max-lag", "0"], ["--max-lag"]),
    (["--windows", "0"], ["--windows"]),
    (["--dtype", "float16"], ["--dtype"]),
])
def test_cli_bad_input(checkpoint, args, names):
    r = invoke("--checkpoint", str(checkpoint), "--text", str(checkpoint.parent / "text.txt"),
               *args)
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    err = r.stderr.strip().splitlines()
    assert len(err) <= 4
    for name in names:
        assert name in err[-1], err


def test_cli_missing_and_corrupt_files(checkpoint, tmp_path):
    text = str(checkpoint.parent / "text.txt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(checkpoint.read_bytes()[:100])
    for args, name in [(["--checkpoint", str(tmp_path / "none.safetensors"), "--text", text],
                        "none.safetensors"),
                       (["--checkpoint", str(bad), "--text", text], "bad.safetensors"),
                       (["--checkpoint", str(checkpoint), "--text", str(tmp_path / "no.txt")],
                        "no.txt"),
                       (["--checkpoint", str(checkpoint), "--text", text, "--plot",
                         str(tmp_path / "no" / "dir" / "g.png")], "g.png")]:
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert name in r.stderr and len(r.stderr.strip().splitlines()) == 1
