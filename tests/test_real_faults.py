"""Real faults, where tests/test_reliability.py simulates them: a file system that is full,
and commands run by a user who lacks the permission.

A full disk, in a real `charrnn train` process, at each of the three system calls of an
atomic checkpoint write (charrnn.fileio.atomic_write_bytes):

- write(2): the run directory on a small tmpfs, filled until half of a checkpoint fits.
- fsync(2): the run directory on ext4 on a loop device whose backing file lives on a full
  tmpfs (thin provisioning). ext4 has room, so write(2) succeeds into the page cache; the
  write-back that fsync waits for fails in the block layer, and fsync returns ENOSPC.
- rename(2): no file system fails a rename on demand (one needs a new directory block only
  when every block of the directory is full, to the byte), so strace injects ENOSPC into the
  process's rename of that checkpoint's temporary file (-P its path; the kernel does not run
  that one call).

Each time: exit 2, one line naming the file and the full disk; every earlier checkpoint
intact (the same bytes, and they load); after space is freed, `--resume` finishes the run
bit for bit as an uninterrupted one. Mounting needs root: those cases skip otherwise.

Permissions: the commands run as nobody when the suite runs as root (the `unprivileged`
fixture of conftest.py), so the kernel, not a monkeypatch, refuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_reliability import (  # tests/ is on sys.path (rootdir conftest)
    assert_same_tensors,
    error_line,
)

from charrnn.checkpoint import load_checkpoint

THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# a checkpoint (weights and Adam moments) of about 2 MB: half of one is far more than the
# slack of a file system's free-space count, and than the small files written before it
MODEL = {"cell": "lstm", "hidden_size": 192, "num_layers": 1, "embedding_size": 16}
TRAIN = {"max_steps": 8, "eval_every": 4, "checkpoint_every": 1, "log_every": 1,
         "lr_schedule": "constant", "seed": 5}
FIRST, LAST = 8, 16  # trained before the fault, and in all
VICTIM = f"ckpt-{FIRST + 1:08d}.safetensors"  # the first write after the resume


# -- helpers ----------------------------------------------------------------------------------


def charrnn_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "charrnn.cli", *map(str, args)]


def write_config(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return path


def digests(run_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.glob("*.safetensors"))}




def timeless_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("chars_per_sec", "elapsed_sec")}
            for r in rows]


def fill(fs: Path, leave: int) -> Path:
    """A file that takes all of `fs`'s free space but `leave` bytes."""
    st = os.statvfs(fs)
    remaining = st.f_bavail * st.f_frsize - leave
    assert remaining > 0, (fs, st)
    filler = fs / "filler"
    with open(filler, "wb") as f:
        while remaining > 0:
            n = min(remaining, 1 << 20)
            f.write(bytes(n))
            remaining -= n
        f.flush()
        os.fsync(f.fileno())
    return filler


class Mounts:
    """File systems mounted by a test (root only), unmounted in its teardown."""

    def __init__(self):
        self.points: list[Path] = []

    def mount(self, target: Path, *args: str) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a test file system: {r.stderr.strip()}")
        self.points.append(target)
        return target

    def tmpfs(self, target: Path, size: str) -> Path:
        return self.mount(target, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs")

    def loop_ext4(self, image: Path, target: Path, size: str = "48M") -> Path:
        """ext4 (no journal, no reserved blocks) in a sparse file, mounted by a loop device."""
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        r = subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0",
                            str(image)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot make an ext4 file system: {r.stderr.strip()}")
        return self.mount(target, "-o", "loop", str(image))

    def remount(self, target: Path, *args: str) -> None:
        """Unmounts and mounts again: what is read next comes from the disk, not the cache."""
        subprocess.run(["umount", str(target)], check=True)
        self.points.remove(target)
        self.mount(target, *args)

    def unmount_all(self) -> None:
        for target in reversed(self.points):
            if subprocess.run(["umount", str(target)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)
        self.points.clear()


@pytest.fixture
def mounts():
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    if not shutil.which("mount"):
        pytest.skip("no mount command")
    m = Mounts()
    try:
        yield m
    finally:
        m.unmount_all()


@pytest.fixture
def setup(tmp_path, corpus_path, config_dict):
    """The environment of the subprocesses, and a config writer for a run directory."""
    env = {**os.environ, **THREADS, "CHARRNN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYTHONWARNINGS", None)

    def config(run_dir: Path, name: str, **train) -> Path:
        d = config_dict(corpus_path, run_dir, model=MODEL, train={**TRAIN, **train})
        return write_config(tmp_path / f"{name}.yaml", d)

    def run(*args, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *charrnn_cmd(*args)], env=env, capture_output=True,
                              text=True, timeout=300)

    return {"config": config, "run": run, "tmp": tmp_path}


def watched(log: Path) -> tuple[str, ...]:
    """A prefix that logs the process's failed write, fsync and rename calls to `log` (strace
    -Z): which call met the full disk. Nothing where strace is not there."""
    strace = shutil.which("strace")
    if not strace:
        return ()
    calls = "write,pwrite64,writev,fsync,fdatasync,rename,renameat,renameat2"
    return (strace, "-f", "--seccomp-bpf", "-qq", "-Z", "-o", str(log), "-e", f"trace={calls}")


def failed_calls(log: Path) -> list[str] | None:
    """The names of the calls that failed with ENOSPC, in order (None without strace)."""
    if not shutil.which("strace"):
        return None
    lines = log.read_text().splitlines()
    return [ln.split("(", 1)[0].split()[-1] for ln in lines if "ENOSPC" in ln]


def straight_run(setup) -> Path:
    """An uninterrupted run to step LAST, on an ordinary disk."""
    run_dir = setup["tmp"] / "straight"
    r = setup["run"]("train", "--config", setup["config"](run_dir, "straight", max_steps=LAST))
    assert r.returncode == 0, r.stderr
    return run_dir


def first_part(setup, run_dir: Path) -> tuple[Path, dict[str, str], int]:
    """Trains to step FIRST in `run_dir`: the config, the checkpoints' digests, and the size
    of a checkpoint."""
    cfg = setup["config"](run_dir, "run")
    r = setup["run"]("train", "--config", cfg)
    assert r.returncode == 0, r.stderr
    before = digests(run_dir)
    assert set(before) == {"best.safetensors", f"ckpt-{FIRST - 1:08d}.safetensors",
                           f"ckpt-{FIRST:08d}.safetensors"}
    return cfg, before, (run_dir / f"ckpt-{FIRST:08d}.safetensors").stat().st_size


def assert_full_disk_refused(r: subprocess.CompletedProcess, run_dir: Path) -> str:
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert f"cannot write {run_dir / VICTIM}: No space left on device" in line, line
    assert "the checkpoints already written are intact" in line, line
    assert "resume with: charrnn train --config" in line, line
    return line


def assert_intact(run_dir: Path, before: dict[str, str]) -> None:
    """The checkpoints of before the fault, byte for byte, and nothing else: no temp file, no
    lock, no half checkpoint."""
    assert digests(run_dir) == before
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert not (run_dir / ".lock").exists()
    for name in before:
        load_checkpoint(run_dir / name, training_state=name.startswith("ckpt-"))


def resume_to_the_end(setup, cfg: Path, run_dir: Path, straight: Path) -> None:
    r = setup["run"]("train", "--config", cfg, "--resume", "--set", f"train.max_steps={LAST}")
    assert r.returncode == 0, r.stderr
    for name in (f"ckpt-{LAST:08d}.safetensors", "best.safetensors"):
        assert_same_tensors(run_dir / name, straight / name)
    assert timeless_rows(run_dir) == timeless_rows(straight)


# -- a full disk ----------------------------------------------------------------------------


def test_disk_full_at_write(setup, mounts) -> None:
    """write(2) fails with ENOSPC half-way through a checkpoint on a full tmpfs."""
    fs = mounts.tmpfs(setup["tmp"] / "fs", "12m")
    run_dir = fs / "run"
    cfg, before, ckpt_size = first_part(setup, run_dir)
    filler = fill(fs, leave=ckpt_size // 2)
    log = setup["tmp"] / "strace.log"
    r = setup["run"]("train", "--config", cfg, "--resume", "--set", f"train.max_steps={LAST}",
                     prefix=watched(log))
    assert_full_disk_refused(r, run_dir)
    assert failed_calls(log) in (None, ["write"])
    assert_intact(run_dir, before)
    filler.unlink()  # space freed
    resume_to_the_end(setup, cfg, run_dir, straight_run(setup))


def test_disk_full_at_fsync(setup, mounts) -> None:
    """fsync(2) fails with ENOSPC: ext4 on a thin loop device whose backing tmpfs is full."""
    backing = mounts.tmpfs(setup["tmp"] / "backing", "56m")  # the image and the filler
    fs = mounts.loop_ext4(backing / "ext4.img", setup["tmp"] / "fs")
    run_dir = fs / "run"
    cfg, before, ckpt_size = first_part(setup, run_dir)
    os.sync()  # all of it in the backing file before that fills up
    # the blocks of the checkpoints rotated away: holes in the backing file again, so that
    # new ones need new space there (ext4 would reuse them, and never run out)
    r = subprocess.run(["fstrim", str(fs)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot discard free blocks of the loop device: {r.stderr.strip()}")
    filler = fill(backing, leave=ckpt_size // 2)
    assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize > 10 * ckpt_size  # ext4: room
    log = setup["tmp"] / "strace.log"
    r = setup["run"]("train", "--config", cfg, "--resume", "--set", f"train.max_steps={LAST}",
                     prefix=watched(log))
    assert_full_disk_refused(r, run_dir)
    assert failed_calls(log) in (None, ["fsync"])  # every write(2) succeeded
    assert_intact(run_dir, before)
    filler.unlink()  # space freed
    mounts.remount(fs, "-o", "loop", str(backing / "ext4.img"))
    assert_intact(run_dir, before)  # on the disk, not only in the page cache
    resume_to_the_end(setup, cfg, run_dir, straight_run(setup))


def test_disk_full_at_rename(setup) -> None:
    """rename(2) of the checkpoint's temp file over its name fails with ENOSPC (injected by
    strace into the real process, for that path alone)."""
    strace = shutil.which("strace")
    if not strace:
        pytest.skip("no strace (apt-get install strace)")
    probe = subprocess.run([strace, "-qq", "-o", os.devnull, "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()}")
    run_dir = setup["tmp"] / "run"
    cfg, before, _ = first_part(setup, run_dir)
    # -D: strace traces from a grandchild, so the traced charrnn keeps the shell's pid, $$,
    # and the temp file's name is known: .<name>.<pid>.tmp
    renames = "rename,renameat,renameat2"
    log = setup["tmp"] / "strace.log"
    inject = ["sh", "-c", f'exec "$0" -D -f --seccomp-bpf -qq -o "{log}" '
              f'-P "{run_dir}/.{VICTIM}.$$.tmp" -e trace={renames} '
              f'-e inject={renames}:error=ENOSPC "$@"', strace]
    r = setup["run"]("train", "--config", cfg, "--resume", "--set", f"train.max_steps={LAST}",
                     prefix=tuple(inject))
    assert_full_disk_refused(r, run_dir)
    assert failed_calls(log) == ["rename"] and "(INJECTED)" in log.read_text()
    assert_intact(run_dir, before)
    resume_to_the_end(setup, cfg, run_dir, straight_run(setup))


# -- permissions ----------------------------------------------------------------------------


@pytest.fixture
def theirs(unprivileged, config_dict, corpus_text):
    """In the unprivileged user's folder: a corpus, a config and a trained run (trained by
    us, readable by them), and a folder they cannot write to."""
    d = unprivileged.dir
    corpus = d / "corpus.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    run_dir = d / "run"
    cfg = write_config(d / "c.yaml", config_dict(corpus, run_dir, train={"max_steps": 4}))
    r = subprocess.run(charrnn_cmd("train", "--config", cfg), env=unprivileged.env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    os.chmod(run_dir, 0o777)
    locked = d / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    return {"u": unprivileged, "corpus": corpus, "cfg": cfg, "run": run_dir, "locked": locked}


def test_train_into_an_unwritable_output_dir(theirs, config_dict) -> None:
    u, locked = theirs["u"], theirs["locked"]
    for out, what in [(locked, f"output.dir {locked} is not writable"),
                      (locked / "run", f"cannot create output.dir {locked / 'run'}: "
                                       "Permission denied")]:
        cfg = write_config(u.dir / "out.yaml", config_dict(theirs["corpus"], out))
        r = u.charrnn("train", "--config", cfg)
        assert r.returncode == 2, r.stderr
        assert what in error_line(r.stderr)
    assert os.listdir(locked) == []


def test_unreadable_config_and_corpus(theirs, config_dict) -> None:
    u = theirs["u"]
    cfg = u.deny(write_config(u.dir / "secret.yaml", config_dict(theirs["corpus"], u.dir / "r")))
    r = u.charrnn("train", "--config", cfg)
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert str(cfg) in line and "not readable" in line, line

    secret = u.dir / "secret.txt"  # not in the cache: it has to be read
    shutil.copy(theirs["corpus"], secret)
    u.deny(secret)
    cfg = write_config(u.dir / "c2.yaml", config_dict(secret, u.dir / "r2"))
    r = u.charrnn("train", "--config", cfg)
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert f"{secret}: cannot read" in line and "Permission denied" in line, line
    assert not list((u.dir / "r2").glob("*.safetensors"))


def test_unreadable_checkpoint(theirs) -> None:
    """sample and info refuse it in one line; --resume refuses it too, naming it, and leaves
    it and the older checkpoint alone (not readable is not damaged: nothing is moved aside)."""
    u, run_dir = theirs["u"], theirs["run"]
    newest = u.deny(run_dir / "ckpt-00000004.safetensors")
    for args in (["sample", "--checkpoint", newest, "--length", "3"], ["info", newest]):
        r = u.charrnn(*args)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        line = error_line(r.stderr)
        assert str(newest) in line and "not readable" in line, line
    before = sorted(os.listdir(run_dir))
    r = u.charrnn("train", "--config", theirs["cfg"], "--resume", "--set", "train.max_steps=6")
    assert r.returncode == 2, r.stderr
    assert error_line(r.stderr) == f"Error: {newest}: Permission denied"
    assert sorted(os.listdir(run_dir)) == before


@pytest.mark.parametrize("command", ["cells", "gradients", "gates"])
def test_inspect_output_in_an_unwritable_folder(theirs, command) -> None:
    u, locked = theirs["u"], theirs["locked"]
    out = locked / ("page.html" if command == "cells" else "plot.png")
    option = {"cells": "--html"}.get(command, "--plot")
    extra = ["--max-lag", "3", "--windows", "1", "--prime", "0"] if command == "gradients" else []
    r = u.charrnn("inspect", command, "--checkpoint", theirs["run"], "--text", theirs["corpus"],
                  option, out, *extra)
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert f"cannot write {out}" in line and f"{locked} is not writable" in line, line
    assert os.listdir(locked) == []


def test_the_unprivileged_user_is_refused_what_root_is_not(unprivileged) -> None:
    """The permission tests above are not vacuous: their commands run as a user that the
    kernel refuses, with no capability left (as nobody when the suite runs as root)."""
    secret = unprivileged.dir / "secret"
    secret.touch()
    unprivileged.deny(secret)
    r = unprivileged.python(
        "import os, sys\n"
        "status = dict(ln.split(':', 1) for ln in open('/proc/self/status'))\n"
        "print(os.getuid(), os.geteuid(), int(status['CapEff'], 16))\n"
        "try:\n"
        "    open(sys.argv[1]).close()\n"
        "except PermissionError:\n"
        "    print('refused')\n", secret)
    assert r.returncode == 0, r.stderr
    uid, euid, caps = map(int, r.stdout.split()[:3])
    assert (uid, euid) == (unprivileged.uid, unprivileged.uid) and caps == 0
    assert r.stdout.split()[3:] == ["refused"]
    if os.geteuid() == 0:
        assert unprivileged.name == "nobody" and uid != 0
