"""The echo task at lag L: a character stream in which some characters repeat the one L
steps earlier, and the loss scored on those characters alone.

The stream is a run of blocks, each L + 2 characters long, over A data symbols ('a', 'b',
... : `symbols(A)`) and two markers outside them, STORE '<' and RECALL '>':

    index   0        1        2 .. L-1              L         L+1
            <        k        f_2 ... f_{L-1}       >         k
            STORE    key      fresh distractors     RECALL    echo = the key, L steps later

- the key k and the distractors f are fresh: independent and uniform over the A symbols;
- the echo at index L + 1 is the key again, the character exactly L steps before it;
- for L = 1 the key itself stands at index L, so there is no RECALL marker and the block is
  `< k k` (three characters: still L + 2); for L = 2 there are no distractors, `< k > k`.

So an echo position can be predicted from the key L steps back, and from nothing else: every
other character in between is independent of the key. The markers say *when* to store and
*when* to recall, so knowing which position is an echo position takes no memory and no
counting (a model needs only the last input or two: RECALL, or at L = 1 STORE before the key).
And what must be held is one symbol, log2(A) bits, whatever L is: the memory a cell needs
grows in time span only, not in capacity. Together with the equal parameter counts, this
is what makes the comparison of cells across lags fair: a cell that fails at a long lag
fails because it cannot bridge the span, not because it cannot find the echo positions or
store L symbols in its units. (The price: one echo position per L + 2 characters, so at
long lags the training signal is sparse.)

Chance on an echo position is ln(A) nats: the key is uniform over A symbols. The markers
are predictable from the block structure (period L + 2), but they are not scored.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

import numpy as np

from ..data import eval_windows
from ..model import token_nll

STORE = "<"  # the next character is the key
RECALL = ">"  # the next character is the echo of the key
MAX_ALPHABET = len(string.ascii_lowercase)


def symbols(alphabet: int) -> str:
    """The A data symbols: 'a', 'b', ... (2 <= A <= 26)."""
    if not 2 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"the alphabet must have 2 to {MAX_ALPHABET} symbols, not {alphabet}")
    return string.ascii_lowercase[:alphabet]


def chance(alphabet: int) -> float:
    """The loss of a uniform guess over the A symbols, ln(A) nats."""
    return math.log(alphabet)


def block_length(lag: int) -> int:
    return lag + 2


def generate(alphabet: int, lag: int, blocks: int, seed: int | Sequence[int]) -> str:
    """`blocks` blocks of the echo stream at lag `lag` (the construction above), from `seed`."""
    if lag < 1:
        raise ValueError(f"the lag must be >= 1, not {lag}")
    chars = np.frombuffer((symbols(alphabet) + STORE + RECALL).encode("ascii"), np.uint8)
    rng = np.random.default_rng(seed)
    n = block_length(lag)
    fresh = rng.integers(0, alphabet, size=(blocks, n), dtype=np.uint8)  # (blocks, L+2)
    codes = chars[fresh]  # (blocks, L+2) every position fresh, then the structure on top
    codes[:, 0] = chars[alphabet]  # STORE
    if lag >= 2:
        codes[:, lag] = chars[alphabet + 1]  # RECALL
    codes[:, lag + 1] = codes[:, 1]  # the echo repeats the key, L steps later
    return codes.tobytes().decode("ascii")


def positions(n: int, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (n,), (n,) of the echo and the fresh (key and distractor) positions of
    a stream of n characters that starts at a block boundary."""
    index = np.arange(n) % block_length(lag)  # (n,) index within the block
    echo = index == lag + 1
    fresh = (index >= 1) & (index <= max(lag - 1, 1))
    return echo, fresh


def echo_nll(
    model,
    ids: np.ndarray,
    lag: int,
    batch_size: int = 1,
    seq_length: int = 256,
    warmup: int = 0,
) -> tuple[float, int]:
    """Total NLL (nats) on the echo positions of the held-out stream `ids` (which starts at
    a block boundary) and the number of echo positions scored.

    A stateful pass as `charrnn.evaluate.score` makes it: `eval_windows` cuts the stream
    into `batch_size` contiguous streams, each from the zero state, the state carried from
    window to window. Only echo targets are scored, and only those whose whole block (the
    STORE marker L + 1 steps back) lies in the part of the stream the model has read, at
    least `warmup` characters after the stream's first: a stream starting mid-block has not
    seen the key of its first echo, and a model trained with carried-over state may predict
    badly for a while after a zero state (an lstm at L = 16: 5.6 nats on the first five
    echoes, 0.4 after them). One long stream (the default) has one such start.

    `model` needs `zero_state(B)`, `forward(x, state)` -> (logits (T*B, V), state, _) and
    `frozen()`, as `charrnn.model.CharRNN` has."""
    ids = np.asarray(ids)
    echo, _ = positions(len(ids), lag)
    index = np.arange(len(ids))  # (N,) the windows of positions, to know what each target is
    total, count = 0.0, 0
    state, first = None, None
    with model.frozen():
        for xi, yi, mask in eval_windows(index, batch_size, seq_length):  # (T, B) each
            if state is None:
                state, first = model.zero_state(xi.shape[1]), xi[0]  # first: (B,) first input
            logits, state, _ = model.forward(ids[xi].astype(np.int64), state)  # (T*B, V)
            keep = mask & echo[yi] & (yi - (lag + 1) >= first + warmup)  # (T, B)
            if keep.any():
                nll = token_nll(logits, ids[yi].reshape(-1).astype(np.int64))  # (T*B,)
                total += float(np.sum(nll[keep.reshape(-1)], dtype=np.float64))
                count += int(keep.sum())
    return total, count
