"""The optional compiled kernels (charrnn/_fused.c) against the numpy code path they replace.

The window loops differ from numpy only by the packed GEMM's summation order and, forward, the
transcendental functions (libm's tanh in float64; in float32 a vectorized Cephes tanhf and
sigmoid gates as 1 / (1 + exp(-x))).  Every test that runs a GEMM runs with each GEMM this
machine has (the AVX-512 and AVX2 + FMA micro-kernels, the portable C loop), crossed with each
variant of the elementwise kernels it has (compiled for AVX-512, AVX2 and baseline x86-64);
what the CPU cannot run skips, saying why.  The header of a pytest run lists the variants."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import charrnn.cells as cells
from charrnn.cells import CELLS, PANEL, pack_panels

try:
    from charrnn import _fused
except ImportError:
    _fused = None

needs_ext = pytest.mark.skipif(_fused is None, reason="charrnn._fused is not built")


@pytest.fixture(params=["avx512", "avx2+fma", "c"])
def gemm(request):
    """Each GEMM of the extension in turn (skipped where the CPU lacks it)."""
    if _fused is None:
        pytest.skip("charrnn._fused is not built")
    before = _fused.gemm_name()
    try:
        _fused.set_gemm(request.param)
    except ValueError:
        pytest.skip(f"no {request.param} GEMM on this machine")
    yield request.param
    _fused.set_gemm(before)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")),
                        set())
    except OSError:
        return set()


CPU_FLAGS = _cpu_flags()
VARIANT_FEATURE = {"avx512": "avx512f", "avx2": "avx2", "baseline": None}


@pytest.fixture(params=list(VARIANT_FEATURE))
def variant(request):
    """Each variant of the elementwise kernels in turn (skipped where the CPU cannot run it or
    the build has only the baseline one)."""
    if _fused is None:
        pytest.skip("charrnn._fused is not built")
    if request.param not in _fused.kernel_variants():
        feature = VARIANT_FEATURE[request.param]
        why = (f"this CPU lacks {feature}" if feature not in CPU_FLAGS
               else "this build compiles the baseline variant only")
        pytest.skip(f"no {request.param} elementwise kernels: {why}")
    before = _fused.kernels_name()
    _fused.set_kernels(request.param)
    yield request.param
    _fused.set_kernels(before)
# float32: the GEMMs sum in different orders, and the differences grow over the window
TOL = {np.float64: dict(rtol=1e-12, atol=1e-14), np.float32: dict(rtol=1e-4, atol=1e-5)}
T, B, H = 6, 5, 24


def _inputs(cell: str, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    G = CELLS[cell].gates
    xproj = rng.standard_normal((T, B, G * H)).astype(dtype)
    W_hh = (0.4 * rng.standard_normal((G * H, H))).astype(dtype)
    b_hh = (0.2 * rng.standard_normal(G * H)).astype(dtype)
    state = tuple(rng.standard_normal((B, H)).astype(dtype) for _ in range(CELLS[cell].num_states))
    dhs = rng.standard_normal((T, B, H)).astype(dtype)
    dstate = tuple(rng.standard_normal((B, H)).astype(dtype) for _ in state)
    return xproj, W_hh, b_hh, state, dhs, dstate


def _forward(cell, kernels, xproj, W_hh, b_hh, state, monkeypatch):
    monkeypatch.setattr(cells, "_fused", kernels)
    ws: dict = {}
    hs, last, cache = CELLS[cell].forward(xproj.copy(), state, W_hh, b_hh, ws)
    return hs, last, cache, ws


def test_pack_panels_layout():
    rng = np.random.default_rng(0)
    for N, K in [(16, 3), (40, 5), (7, 1), (33, 4)]:
        W = rng.standard_normal((N, K))
        for source in (W, np.asfortranarray(W), W.T.copy().T):  # any memory layout
            packed = pack_panels(source)
            assert packed.shape == (-(-N // PANEL), K, PANEL)
            for p in range(packed.shape[0]):
                for j in range(PANEL):
                    expected = W[p * PANEL + j] if p * PANEL + j < N else np.zeros(K)
                    np.testing.assert_array_equal(packed[p, :, j], expected)
    assert _fused is None or _fused.PANEL == PANEL


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gemm_matches_numpy(gemm, dtype):
    rng = np.random.default_rng(1)
    for M in (1, 2, 3, 5, 6, 7, 13, 32):
        for N in (1, 15, 16, 17, 40):
            for K in (1, 3, 64):
                a = rng.standard_normal((M, K)).astype(dtype)
                W = rng.standard_normal((N, K)).astype(dtype)
                c0 = rng.standard_normal((M, N)).astype(dtype)
                exact = a.astype(np.float64) @ W.T.astype(np.float64)
                tol = dict(rtol=0, atol=(1e-12 if dtype == np.float64 else 2e-5) * K)
                for accumulate in (False, True):
                    c = c0.copy()
                    _fused.gemm(a, pack_panels(W), c, accumulate)
                    np.testing.assert_allclose(c, exact + c0 * accumulate, **tol,
                                               err_msg=f"M={M} N={N} K={K} acc={accumulate}")


@needs_ext
def test_fma_gemms_agree_bit_for_bit():
    """The AVX-512 GEMM (tiles of two panels, a long K in chunks whose running sums wait in
    memory) against the AVX2 one (one panel, all of K at once): the same chain of FMAs for
    every element, so the same float32 results. Shapes cover a lone last panel, a partial
    second one, K at and past the chunk limit, and several row blocks."""
    if not {"avx512", "avx2+fma"} <= set(_fused.gemm_variants()):
        pytest.skip("needs a CPU with AVX-512 and AVX2")
    rng = np.random.default_rng(4)
    before = _fused.gemm_name()
    try:
        for M, N, K in [(1, 33, 512), (7, 48, 385), (8, 65, 384), (16, 2048, 512),
                        (31, 1536, 700), (300, 80, 512), (9, 17, 1000), (130, 2048, 256)]:
            a = rng.standard_normal((M, K)).astype(np.float32)
            packed = pack_panels(rng.standard_normal((N, K)).astype(np.float32))
            c0 = rng.standard_normal((M, N)).astype(np.float32)
            for accumulate in (False, True):
                results = []
                for name in ("avx512", "avx2+fma"):
                    _fused.set_gemm(name)
                    c = c0.copy()
                    _fused.gemm(a, packed, c, accumulate)
                    results.append(c)
                np.testing.assert_array_equal(*results, err_msg=f"M={M} N={N} K={K}")
    finally:
        _fused.set_gemm(before)


@needs_ext
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_forward_matches_numpy(cell, dtype, gemm, variant, monkeypatch):
    xproj, W_hh, b_hh, state, _, _ = _inputs(cell, dtype)
    hs_f, last_f, cache_f, _ = _forward(cell, _fused, xproj, W_hh, b_hh, state, monkeypatch)
    hs_n, last_n, cache_n, _ = _forward(cell, None, xproj, W_hh, b_hh, state, monkeypatch)
    assert hs_f.dtype == dtype
    np.testing.assert_allclose(hs_f, hs_n, **TOL[dtype])
    for a, b in zip(last_f, last_n, strict=True):
        np.testing.assert_allclose(a, b, **TOL[dtype])
    assert cache_f.keys() == cache_n.keys()
    for key in cache_f:  # everything backward reads: activations, c, tanh(c), W_hn h + b_hn
        np.testing.assert_allclose(cache_f[key], cache_n[key], **TOL[dtype], err_msg=key)


@needs_ext
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_backward_matches_numpy(cell, dtype, gemm, variant, monkeypatch):
    xproj, W_hh, b_hh, state, dhs, dstate = _inputs(cell, dtype, seed=1)
    grads = {}
    for name, kernels in [("fused", _fused), ("numpy", None)]:
        # the same (numpy) forward for both, so that backward sees identical caches
        _, _, cache, ws = _forward(cell, None, xproj, W_hh, b_hh, state, monkeypatch)
        monkeypatch.setattr(cells, "_fused", kernels)
        dx, dW, db, d0 = CELLS[cell].backward(dhs, dstate, cache, W_hh, ws)
        grads[name] = [a.copy() for a in (dx, dW, db, *d0)]
    for a, b in zip(grads["fused"], grads["numpy"], strict=True):
        np.testing.assert_allclose(a, b, **TOL[dtype])


@needs_ext
def test_noncontiguous_input_falls_back_to_numpy(monkeypatch):
    xproj, W_hh, b_hh, state, _, _ = _inputs("lstm", np.float64)
    wide = np.zeros((T, B, 2 * xproj.shape[2]))
    strided = wide[:, :, ::2]
    strided[...] = xproj
    monkeypatch.setattr(cells, "_fused", _fused)
    hs_s, _, _ = CELLS["lstm"].forward(strided, state, W_hh, b_hh, {})
    hs_c, _, _, _ = _forward("lstm", None, xproj, W_hh, b_hh, state, monkeypatch)
    np.testing.assert_allclose(hs_s, hs_c, rtol=1e-12, atol=1e-14)


def _one_step(cell: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One forward step of `cell` from a zero state with zero recurrent weights, x (B, G*H)
    as the pre-activations: (hs[1], the activations)."""
    Bx, G = x.shape
    H = G // CELLS[cell].gates
    acts = x[None].copy()
    hs = np.zeros((2, Bx, H), x.dtype)
    packed = pack_panels(np.zeros((G, H), x.dtype))
    if cell == "rnn":
        _fused.rnn_forward(acts, packed, hs)
    else:
        cs, tanh_c = np.zeros((2, Bx, H), x.dtype), np.zeros((1, Bx, H), x.dtype)
        _fused.lstm_forward(acts, packed, hs, cs, tanh_c)
    return hs[1], acts[0]


@needs_ext
def test_float32_tanh_edge_values(variant):
    x = np.array([0.0, -0.0, 1e-30, -1e-8, 0.3, 0.6249, 0.625, -0.7, 3.0, 8.9, 9.5, -20.0,
                  1e30, np.inf, -np.inf, np.nan], np.float32)
    h, _ = _one_step("rnn", x[None])
    np.testing.assert_allclose(h[0], np.tanh(x), rtol=5e-7, atol=0)  # NaN where numpy has NaN
    x = (np.random.default_rng(0).standard_normal((100, 1000)) * 4).astype(np.float32)
    h, _ = _one_step("rnn", x)
    np.testing.assert_allclose(h, np.tanh(x), rtol=5e-7, atol=0)


@needs_ext
def test_float32_tanh_saturates_at_one(variant):
    x = np.array([10.0, 20.0, 1e30, np.inf, -10.0, -np.inf], np.float32)
    h, _ = _one_step("rnn", x[None])
    np.testing.assert_array_equal(h[0], np.sign(x))


def test_kernels_refuse_arrays_they_cannot_take():
    if _fused is None:
        assert cells.kernels(np.zeros(3)) is None
        return
    f32, f64 = np.zeros((2, 3), np.float32), np.zeros((2, 3))
    assert cells.kernels(f32, f32) is _fused and cells.kernels() is _fused
    for arrays in [(f32, f64), (f32.astype(">f4"),), (f32.astype(np.float16),), (f64[:, ::2],)]:
        assert cells.kernels(*arrays) is None


def test_a_build_with_another_api_is_ignored():
    """A stale charrnn/_fused*.so (say, left by a failed rebuild) is not used."""
    code = ("import sys, types, charrnn; fake = types.ModuleType('charrnn._fused'); "
            "fake.API = 1; sys.modules['charrnn._fused'] = fake; "
            "import charrnn.cells as c; print(c.accelerated())")
    env = {k: v for k, v in os.environ.items() if k != "CHARRNN_ACCEL"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@needs_ext
def test_float32_sigmoid_gates(variant):
    """The LSTM's i gate against the exact sigmoid of x = 2u (u: the pre-scaled input):
    within 2 ulp while exp is not clamped, 1e-7 absolute everywhere."""
    Bx, Hx = 40, 500
    u = (np.random.default_rng(1).standard_normal((Bx, Hx)) * 6).astype(np.float32)
    u.flat[:9] = [0.0, -0.0, 1e-30, 43.0, -43.0, 60.0, -60.0, np.inf, -np.inf]
    u.flat[9] = np.nan
    a = np.zeros((Bx, 4 * Hx), np.float32)
    a[:, :Hx] = u
    _, acts = _one_step("lstm", a)
    gate = acts[:, :Hx].astype(np.float64)
    exact = 1.0 / (1.0 + np.exp(-2.0 * u.astype(np.float64)))
    assert np.isnan(gate.flat[9])
    finite = np.isfinite(u)
    np.testing.assert_allclose(gate[finite], exact[finite], rtol=0, atol=1e-7)
    unclamped = finite & (np.abs(2 * u) < 87)
    ulp = np.spacing(exact[unclamped].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(gate[unclamped] - exact[unclamped]) / ulp) <= 2.0


def _lstm_forward_args(bad: str = ""):
    """Arguments of lstm_forward for T=3, B=2, H=2, with one thing wrong."""
    acts = np.zeros((3, 2, 8))
    packed = pack_panels(np.zeros((8, 2)))
    hs, cs, tanh_c = np.zeros((4, 2, 2)), np.zeros((4, 2, 2)), np.zeros((3, 2, 2))
    if bad == "non-contiguous":
        acts = np.zeros((3, 2, 16))[:, :, ::2]
    elif bad == "mixed dtypes":
        packed = packed.astype(np.float32)
    elif bad == "integer":
        acts = acts.astype(np.int64)
    elif bad == "shape":
        cs = np.zeros((3, 2, 2))
    elif bad == "packed shape":
        packed = np.zeros((1, 3, PANEL))
    elif bad == "read-only output":
        hs = np.broadcast_to(np.zeros(2), (4, 2, 2))
    elif bad == "overlap":
        cs = hs
    return acts, packed, hs, cs, tanh_c


@needs_ext
@pytest.mark.parametrize(
    "bad",
    ["non-contiguous", "mixed dtypes", "integer", "shape", "packed shape", "read-only output",
     "overlap"],
)
def test_kernels_reject_bad_arrays(bad):
    _fused.lstm_forward(*_lstm_forward_args())  # the unspoiled arguments are fine
    with pytest.raises(ValueError):
        _fused.lstm_forward(*_lstm_forward_args(bad))
    with pytest.raises(TypeError):
        _fused.lstm_forward(*_lstm_forward_args()[:2])


@needs_ext
def test_gemm_rejects_bad_arrays():
    a, c = np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32)
    packed = pack_panels(np.zeros((5, 4), np.float32))
    _fused.gemm(a, packed, c, False)
    for args in [
        (a, pack_panels(np.zeros((5, 3), np.float32)), c),  # K differs
        (a, packed, np.zeros((3, 17), np.float32)),  # N needs two panels
        (a.astype(np.float64), packed, c),  # mixed dtypes
        (a, packed, np.zeros((2, 5), np.float32)),  # M differs
        (a, packed, c[:, ::2]),  # non-contiguous output
    ]:
        with pytest.raises(ValueError):
            _fused.gemm(*args, False)
    square = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError):  # the output is also the input
        _fused.gemm(square, pack_panels(square), square, True)
    with pytest.raises(ValueError):
        _fused.set_gemm("no-such-gemm")


def test_env_var_switches_the_kernels_off():
    code = "import charrnn.cells as c; print(c.accelerated())"
    env = {**os.environ, "CHARRNN_ACCEL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
    env.pop("CHARRNN_ACCEL")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == str(_fused is not None)


def _stepper_run(cell: str, dtype, B: int, kernels, monkeypatch) -> list[np.ndarray]:
    """Logits and states of 4 generation steps of a 2-layer model, B streams, through the
    per-step kernels (lstm_step, gru_step, rnn_step) or the numpy lines beside them."""
    from charrnn.model import CharRNN, ModelShape

    monkeypatch.setattr(cells, "_fused", kernels)
    model = CharRNN.create(ModelShape(cell, 11, 37, 2, 5), seed=1, dtype=np.dtype(dtype).name)
    stepper, state = model.stepper(), model.zero_state(B)
    out = []
    for t in range(4):
        logits, state = stepper.step((np.arange(B) * 3 + t) % 11, state)
        out += [logits, *(a for layer in state for a in layer)]
    return out


@needs_ext
@pytest.mark.parametrize("B", [1, 3])  # one stream: numpy's products; more: the packed GEMM
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_step_kernels_match_numpy(cell, dtype, B, gemm, variant, monkeypatch):
    fused = _stepper_run(cell, dtype, B, _fused, monkeypatch)
    reference = _stepper_run(cell, dtype, B, None, monkeypatch)
    for a, b in zip(fused, reference, strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, **TOL[dtype])


def _everything(cell: str, dtype, Bx: int, Hx: int, monkeypatch) -> list[np.ndarray]:
    """Every output of the compiled forward and backward loops of a window of B=Bx, H=Hx,
    then of generation steps and of float32's special values."""
    rng = np.random.default_rng(Hx)
    G = CELLS[cell].gates
    xproj = (2 * rng.standard_normal((T, Bx, G * Hx))).astype(dtype)
    W_hh = (0.4 * rng.standard_normal((G * Hx, Hx))).astype(dtype)
    b_hh = (0.2 * rng.standard_normal(G * Hx)).astype(dtype)
    state = tuple(rng.standard_normal((Bx, Hx)).astype(dtype)
                  for _ in range(CELLS[cell].num_states))
    dhs = rng.standard_normal((T, Bx, Hx)).astype(dtype)
    dstate = tuple(rng.standard_normal((Bx, Hx)).astype(dtype) for _ in state)
    hs, last, cache, ws = _forward(cell, _fused, xproj, W_hh, b_hh, state, monkeypatch)
    out = [a.copy() for a in (hs, *last, *cache.values())]
    out += [a.copy() for a in CELLS[cell].backward(dhs, dstate, cache, W_hh, ws)[:3]]
    out += _stepper_run(cell, dtype, Bx, _fused, monkeypatch)
    special = np.array([0.0, -0.0, 1e-30, 0.625, -20.0, 44.0, 1e30, np.inf, -np.inf, np.nan])
    x = np.resize(special, (Bx, G * Hx)).astype(dtype)
    out += list(_one_step("lstm" if cell == "lstm" else "rnn", x))
    return out


@needs_ext
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_variants_compute_the_same_bits(cell, dtype, monkeypatch):
    """The variants differ only in vector width: the same IEEE operations, elementwise, with
    no reduction and no FMA contraction, so every variant gives the baseline's bits exactly;
    sizes that leave the vector loops a remainder included (H=7, 37)."""
    variants = _fused.kernel_variants()
    if len(variants) < 2:
        pytest.skip(f"only the {variants[0]} elementwise kernels here: nothing to compare")
    before = _fused.kernels_name()
    try:
        for Bx, Hx in [(1, 7), (5, 24), (3, 37)]:
            results = {}
            for name in variants:
                _fused.set_kernels(name)
                results[name] = _everything(cell, dtype, Bx, Hx, monkeypatch)
            for name in variants[:-1]:
                for k, (a, b) in enumerate(zip(results[name], results["baseline"], strict=True)):
                    np.testing.assert_array_equal(
                        a, b, err_msg=f"{name} vs baseline, B={Bx} H={Hx}, output {k}")
    finally:
        _fused.set_kernels(before)


@needs_ext
def test_every_variant_the_cpu_runs_is_there():
    """No variant the CPU could run skips because the build left it out, where the build
    compiles them all (GCC on x86-64 Linux with glibc); unknown names are refused."""
    kernels, gemms = _fused.kernel_variants(), _fused.gemm_variants()
    assert kernels[-1] == "baseline" and gemms[-1] == "c"
    assert _fused.kernels_name() == kernels[0] and _fused.gemm_name() == gemms[0]  # the best
    cc = sysconfig.get_config_var("CC") or ""
    if (sys.platform == "linux" and platform.machine() == "x86_64" and "gcc" in cc
            and "clang" not in cc and platform.libc_ver()[0] == "glibc"):
        runs = [v for v, feature in VARIANT_FEATURE.items() if feature in CPU_FLAGS | {None}]
        assert list(kernels) == runs
        if {"avx2", "fma"} <= CPU_FLAGS:
            assert gemms == (("avx512",) if "avx512f" in CPU_FLAGS else ()) + ("avx2+fma", "c")
    for bad in ["avx512f", "default", "sse2", "no-such-variant"]:
        with pytest.raises(ValueError, match="not available"):
            _fused.set_kernels(bad)
    assert _fused.kernels_name() == kernels[0]


REPO = Path(__file__).resolve().parents[1]


def _pytest_session(hide: str, require: bool) -> subprocess.CompletedProcess:
    """A pytest session in a subprocess running one test of this file, with the extension
    `hide`: "missing" (its import fails, as where it was not built), "stale" (a build with
    another API), or "" (as built); CHARRNN_REQUIRE_ACCEL=1 if `require`."""
    hiding = {
        "missing": "sys.modules['charrnn._fused'] = None",  # import charrnn._fused fails
        "stale": "fake = types.ModuleType('charrnn._fused'); fake.API, fake.PANEL = 1, 16; "
        "sys.modules['charrnn._fused'] = fake",
        "": "pass",
    }[hide]
    code = (f"import sys, types; {hiding}; import pytest; sys.exit(pytest.main(['-q', '-p', "
            "'no:cacheprovider', 'tests/test_accel.py::test_pack_panels_layout']))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("CHARRNN_ACCEL", "CHARRNN_REQUIRE_ACCEL", "PYTEST_ADDOPTS")}
    if require:
        env["CHARRNN_REQUIRE_ACCEL"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("hide", ["missing", "stale"])
def test_ci_fails_at_start_without_the_compiled_kernels(hide):
    """.ci/run sets CHARRNN_REQUIRE_ACCEL=1: a build that failed (setup.py's optional=True
    lets the install go on) or a stale one fails the session before any test runs, where
    otherwise every test of the compiled path would skip and CI stay green."""
    out = _pytest_session(hide, require=True)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    why = "is not built" if hide == "missing" else "is stale (API 1; this charrnn needs"
    assert f"CHARRNN_REQUIRE_ACCEL=1, but the compiled extension charrnn._fused {why}" in text
    assert "passed" not in text
    out = _pytest_session(hide, require=False)  # users: the numpy path, tests pass
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


@needs_ext
def test_ci_runs_with_the_compiled_kernels():
    out = _pytest_session("", require=True)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr
