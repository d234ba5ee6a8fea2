"""Download tiny-shakespeare (1,115,394 characters) to data/tinyshakespeare.txt.

    python scripts/download_shakespeare.py [--output data/tinyshakespeare.txt]

Needs internet access; standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.request
from pathlib import Path

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CHARS = 1_115_394


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="data/tinyshakespeare.txt", type=Path)
    parser.add_argument("--url", default=URL)
    args = parser.parse_args()
    if args.output.exists():
        print(f"{args.output} already exists")
        return 0
    try:
        with urllib.request.urlopen(args.url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        print(f"cannot download {args.url}: {e}", file=sys.stderr)
        return 1
    text = data.decode("utf-8")
    if len(text) != CHARS:
        print(f"unexpected length {len(text)} (expected {CHARS})", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()[:16]
    print(f"wrote {args.output} ({len(text):,} chars, sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
