"""Shared fixtures: a small corpus on disk, tiny training configs, and a private cache dir."""

from __future__ import annotations

import os

# One BLAS thread unless the caller says otherwise (set before numpy loads OpenBLAS): the
# models' matrices are small, and on a busy 2-core machine OpenBLAS's spinning threads made
# the training tests 10-15x slower. Subprocesses started by the tests inherit it.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import copy  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from charrnn.config import Config, config_from_dict  # noqa: E402

_WORDS = (
    "the quick brown fox jumps over a lazy dog and then the cat sat on the mat "
    "while a bird sang to the moon in the still of night so it goes"
).split()


def small_text(n_words: int = 3000, seed: int = 0) -> str:
    """A deterministic pseudo-English text (~15k chars for 3000 words), lines of 12 words."""
    rng = np.random.default_rng(seed)
    words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), n_words)]
    lines = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


def pytest_sessionstart(session):
    """With CHARRNN_REQUIRE_ACCEL=1 (as .ci/run sets it), a session whose compiled kernels
    cannot run fails at once instead of skipping their tests: the extension is optional for
    users (setup.py builds it with optional=True), not for CI."""
    if os.environ.get("CHARRNN_REQUIRE_ACCEL") != "1":
        return
    from charrnn.cells import build_problem

    if problem := build_problem():
        pytest.exit(f"CHARRNN_REQUIRE_ACCEL=1, but {problem}", returncode=1)


def pytest_report_header(config):
    """Which variants of the compiled kernels this CPU runs, and so which the tests run."""
    try:
        from charrnn import _fused
    except ImportError:
        return "charrnn._fused: not built (the tests of the compiled kernels skip)"
    if not hasattr(_fused, "kernel_variants"):
        return "charrnn._fused: a stale build"
    return (f"charrnn._fused: elementwise kernels {', '.join(_fused.kernel_variants())}; "
            f"GEMMs {', '.join(_fused.gemm_variants())}")


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """Corpus caches go to a temporary folder, never to ~/.cache (subprocesses inherit it)."""
    cache = tmp_path_factory.mktemp("charrnn-cache")
    monkeypatch.setenv("CHARRNN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(params=["fused", "numpy"])
def both_paths(request, monkeypatch):
    """Runs a test through the compiled per-step kernels of charrnn/_fused.c (skipped where the
    extension is not built) and through the pure-numpy code path of charrnn.cells."""
    import charrnn.cells as cells

    kernels = None
    if request.param == "fused":
        if problem := cells.build_problem():  # not built, or stale
            pytest.skip(problem)
        from charrnn import _fused as kernels
    monkeypatch.setattr(cells, "_fused", kernels)
    return request.param


@pytest.fixture
def corpus_path(tmp_path) -> Path:
    """A ~15k-character corpus file in tmp_path."""
    path = tmp_path / "corpus.txt"
    path.write_text(small_text(), encoding="utf-8")
    return path


def tiny_config_dict(data_path: str | Path, run_dir: str | Path, **sections: dict) -> dict:
    """A config for a model that trains in well under a second per few dozen steps.

    `sections` are merged key by key over the defaults, e.g. train={"max_steps": 20}."""
    d: dict[str, dict[str, Any]] = {
        "data": {"path": str(data_path), "val_fraction": 0.1},
        "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 1, "embedding_size": 8},
        "train": {
            "batch_size": 4,
            "seq_length": 16,
            "max_steps": 20,
            "learning_rate": 0.01,
            "eval_every": 10,
            "log_every": 5,
            "seed": 7,
            "eval_max_chars": 2000,
        },
        "output": {"dir": str(run_dir), "keep_last": 2},
    }
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return copy.deepcopy(d)


@pytest.fixture
def config_dict():
    """The function tiny_config_dict(data_path, run_dir, **sections) -> a raw config dict."""
    return tiny_config_dict


@pytest.fixture
def corpus_text() -> str:
    """The text of the corpus_path file."""
    return small_text()


@pytest.fixture
def tiny_config(corpus_path, tmp_path):
    """Factory: tiny_config(run="run", model={...}, train={...}) -> a validated Config."""

    def make(run: str = "run", **sections: dict) -> Config:
        return config_from_dict(tiny_config_dict(corpus_path, tmp_path / run, **sections))

    return make


@pytest.fixture
def write_config(tmp_path):
    """Factory: write_config(dict, name="config.yaml") -> the path of a YAML config file."""

    def write(d: dict, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
        return path

    return write


class Unprivileged:
    """Runs charrnn commands and Python code as a user that root's powers do not help: nobody
    (by tests/unprivileged.py) when the suite runs as root, else the user running it.

    `dir` is a folder of theirs (world-writable, outside pytest's root-only tmp_path), with
    the cache dir of the commands in it; `deny(path)` takes every permission on `path` away
    from them (chmod 0: its owner, root or us, is not them, or does not bypass modes)."""

    LAUNCHER = Path(__file__).with_name("unprivileged.py")

    def __init__(self, uid: int, gid: int, name: str, root: Path):
        self.uid, self.gid, self.name, self.dir = uid, gid, name, root
        (root / "cache").mkdir(mode=0o777)
        os.chmod(root / "cache", 0o777)
        self.env = {**os.environ, "CHARRNN_CACHE_DIR": str(root / "cache"),
                    "MPLCONFIGDIR": str(root / "cache"), "HOME": str(root)}
        self.env.pop("PYTHONWARNINGS", None)

    def _run(self, *argv: str, timeout: float) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(self.LAUNCHER), str(self.uid), str(self.gid), *argv]
        return subprocess.run(cmd, env=self.env, cwd=self.dir, capture_output=True, text=True,
                              timeout=timeout)

    def charrnn(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return self._run("-m", "charrnn.cli", *map(str, args), timeout=timeout)

    def python(self, code: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return self._run("-c", code, *map(str, args), timeout=timeout)

    @staticmethod
    def deny(path: Path) -> Path:
        os.chmod(path, 0)
        return path


@pytest.fixture
def unprivileged():
    """An Unprivileged runner; skipped where there is no such user (not POSIX, no nobody)."""
    if os.name != "posix":
        pytest.skip("permission tests need a POSIX system")
    if os.geteuid() == 0:
        import grp
        import pwd

        try:
            user = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no user 'nobody' to run as")
        try:
            gid = grp.getgrnam("nogroup").gr_gid
        except KeyError:
            gid = user.pw_gid
        uid, name = user.pw_uid, "nobody"
    else:
        uid, gid, name = os.getuid(), os.getgid(), "this user"
    root = Path(tempfile.mkdtemp(prefix="charrnn-unprivileged-"))
    os.chmod(root, 0o777)
    try:
        yield Unprivileged(uid, gid, name, root)
    finally:
        for p in root.rglob("*"):  # a denied folder would stop rmtree as a non-root user
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o700)
        shutil.rmtree(root, ignore_errors=True)
