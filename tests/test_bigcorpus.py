"""A 200 MB corpus: streamed in chunks (never one string), encoded once into a cache that
later runs memory-map, and training starts in seconds with a bounded memory footprint.

The corpus is mixed ASCII and multi-byte UTF-8 (é, ü, —, €, 東京, ...): as one Python
string it would take 4 bytes per character (about 800 MB), so a peak RSS well under that
shows that nothing ever holds the whole text.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

import charrnn.data
from charrnn.config import config_from_dict
from charrnn.data import CHUNK_CHARS, load_corpus

SIZE = 200 * 10**6
THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_WORDS = ("the quick brown fox jumps over a lazy dog café naïve über façade 東京 € — "
          "«quote» ROMEO: JULIET: to be or not to be, that is the question").split()


def write_corpus(path: Path, size: int = SIZE) -> int:
    """~`size` bytes of UTF-8: a 1 MB block of random words, each copy tagged with its
    number so that no two megabytes are alike. Returns the number of characters."""
    rng = random.Random(0)
    lines, n = [], 0
    while n < 1 << 20:
        line = " ".join(rng.choice(_WORDS) for _ in range(12)) + "\n"
        lines.append(line)
        n += len(line.encode())
    block = "".join(lines)
    block_bytes, block_chars = block.encode(), len(block)
    written = chars = 0
    with open(path, "wb") as f:
        i = 0
        while written < size:
            tag = f"{i:06d} ".encode()
            f.write(tag + block_bytes)
            written += len(tag) + len(block_bytes)
            chars += len(tag) + block_chars
            i += 1
    return chars


@dataclass
class Measured:
    start_s: float  # until the run directory is set up and the first step begins
    total_s: float
    peak_rss_mb: float
    stderr: str


def train_measured(cfg: Path, env: dict) -> Measured:
    """Runs `charrnn train` as a child process; its own peak RSS comes from wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "charrnn.cli", "train", "--config",
                             str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    start, lines = None, []
    for line in proc.stderr:
        lines.append(line)
        if start is None and line.startswith("charrnn:"):  # printed as training starts
            start = time.perf_counter() - t0
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr
    assert start is not None, stderr
    return Measured(start, total, usage.ru_maxrss / 1024, stderr)  # ru_maxrss: KiB


@pytest.mark.slow
def test_200mb_corpus_streams_caches_and_trains(tmp_path, monkeypatch) -> None:
    corpus = tmp_path / "corpus.txt"
    t0 = time.perf_counter()
    n_chars = write_corpus(corpus)
    gen_s = time.perf_counter() - t0
    assert corpus.stat().st_size >= SIZE
    cache = tmp_path / "cache"
    env = {**os.environ, **THREADS, "CHARRNN_CACHE_DIR": str(cache)}
    d = {
        "data": {"path": str(corpus), "val_fraction": 0.001},
        "model": {"cell": "gru", "hidden_size": 32, "num_layers": 1, "embedding_size": 8},
        "train": {"batch_size": 8, "seq_length": 32, "max_steps": 5, "eval_every": 5,
                  "eval_max_chars": 20000},
        "output": {"dir": str(tmp_path / "run1")},
    }
    cfg1 = tmp_path / "c1.yaml"
    cfg1.write_text(yaml.safe_dump(d))
    d["output"]["dir"] = str(tmp_path / "run2")
    cfg2 = tmp_path / "c2.yaml"
    cfg2.write_text(yaml.safe_dump(d))

    first = train_measured(cfg1, env)  # reads, encodes, caches
    (npy,) = cache.glob("corpus-*.npy")
    second = train_measured(cfg2, env)  # memory-maps the cache
    print(f"\n200 MB corpus ({n_chars:,} chars, written in {gen_s:.1f} s): "
          f"first run starts training after {first.start_s:.1f} s, done in "
          f"{first.total_s:.1f} s, peak RSS {first.peak_rss_mb:.0f} MB; with the cache: "
          f"{second.start_s:.2f} s, {second.total_s:.2f} s, {second.peak_rss_mb:.0f} MB")

    assert f"corpus {n_chars:,} chars" in first.stderr
    assert first.start_s < 60 and second.start_s < 60
    # a whole-corpus str would be 4 bytes/char (~800 MB); the ids are 1 byte/char
    assert first.peak_rss_mb < 1024 and first.peak_rss_mb < 2 * n_chars / 2**20 + 150
    # cached: ids of 1 byte per character, memory-mapped, so barely any RSS at all
    assert npy.stat().st_size < n_chars + 1024
    assert second.peak_rss_mb < first.peak_rss_mb and second.peak_rss_mb < 300
    assert second.start_s < first.start_s

    # in-process: both passes over the text are chunked; the cached ids are an np.memmap
    # and the splits are views of it, not copies
    sizes: list[int] = []
    real_read_chunks = charrnn.data.read_chunks

    def spy(*args, **kwargs):
        for chunk in real_read_chunks(*args, **kwargs):
            sizes.append(len(chunk))
            yield chunk

    monkeypatch.setattr(charrnn.data, "read_chunks", spy)
    data_cfg = config_from_dict({"data": {"path": str(corpus), "val_fraction": 0.001}}).data
    cached = load_corpus(data_cfg, cache_dir=cache)
    assert not sizes  # the cache hit reads no text at all
    for split in (cached.train, cached.val):
        assert isinstance(split, np.memmap) and Path(split.filename) == npy
    assert cached.num_chars == n_chars and cached.train.dtype == np.uint8
    fresh = load_corpus(data_cfg, cache_dir=None)  # no cache: streamed twice
    assert len(sizes) >= 2 * (n_chars // CHUNK_CHARS) and max(sizes) <= CHUNK_CHARS
    assert np.array_equal(fresh.train[-10**6 :], cached.train[-10**6 :])
    assert np.array_equal(fresh.val, cached.val)
    assert fresh.vocab == cached.vocab
