"""Runs a charrnn command, or Python code, as an unprivileged user: how the permission tests
meet a real EACCES when the suite runs as root (root may read and write anything).

    python tests/unprivileged.py UID GID -m charrnn.cli ARGS...    a charrnn command (main())
    python tests/unprivileged.py UID GID -c CODE ARGS...           Python code

Root's interpreter imports charrnn (every module) and its dependencies, then gives up root
for good: no supplementary groups, gid GID, uid UID (setuid from root to another uid clears
the permitted, effective and ambient capabilities), and checks that it did, before anything
of the test is touched. From then on the kernel checks each open, mkdir and rename against
UID:GID, as it would for a command started by that user.

Why not `setpriv --reuid=nobody ... python`: the interpreter lives under /root (mode 0700),
which nobody cannot enter. pyenv's 3.10 then does not start at all (libpython3.10.so is out
of reach); 3.11 starts only because the dynamic loader falls back on the system's libpython,
another build of Python. Dropping the credentials after the imports runs the real
interpreter, whichever it is.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys


def _import_everything() -> None:
    import charrnn
    import charrnn.cli  # noqa: F401  (click, numpy, yaml, safetensors, tqdm)

    for mod in pkgutil.walk_packages(charrnn.__path__, "charrnn."):
        if mod.name != "charrnn._fused":  # optional: imported by charrnn.cells if built
            importlib.import_module(mod.name)
    import encodings

    for mod in pkgutil.iter_modules(encodings.__path__, "encodings."):  # --encoding=any
        try:
            importlib.import_module(mod.name)
        except Exception:  # another platform's codec (mbcs, oem)
            pass
    for lazy in ("mmap", "secrets", "numpy.random", "numpy.linalg", "numpy.lib.format", "io",
                 "hashlib", "json", "html", "base64", "zlib", "struct", "tempfile", "shutil"):
        importlib.import_module(lazy)  # imported by numpy or charrnn on first use
    import sysconfig

    sysconfig.get_paths()  # loads and caches _sysconfigdata_* (charrnn.config asks for it)


def _drop(uid: int, gid: int) -> None:
    if os.geteuid() != 0:  # already an ordinary user: run as it
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, v in (ln.split(":", 1) for ln in f) if k.startswith("Cap")}
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid, uid, gid, gid) or (
            int(caps["CapEff"], 16) or int(caps["CapPrm"], 16)) or os.getgroups() not in (
            [], [gid]):
        sys.exit(f"unprivileged.py: could not drop to {uid}:{gid} ({caps})")


def main() -> None:
    uid, gid, how, what, *args = sys.argv[1:]
    _import_everything()
    _drop(int(uid), int(gid))
    if how == "-m":
        sys.argv = [what, *args]
        sys.exit(importlib.import_module(what).main())
    elif how == "-c":
        sys.argv = ["-c", *args]
        exec(compile(what, "<unprivileged>", "exec"), {"__name__": "__main__"})
    else:
        sys.exit(f"unprivileged.py: -m MODULE or -c CODE, not {how!r}")


if __name__ == "__main__":
    main()
