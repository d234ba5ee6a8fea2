"""Sampling: prime on seed text, then draw one character at a time from the softmax.

Every stream of a `--num-samples` batch shares the primed state and then draws its own
characters; temperature 0 is argmax, top-k and top-p restrict the distribution first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .errors import VocabError
from .model import CharRNN, Stepper
from .parallel import columns, run_groups
from .vocab import Vocab, describe_unknown


def next_char_probs(
    logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> np.ndarray:
    """Probabilities (B, V) in float64 from logits (B, V) after temperature, top-k, top-p."""
    z = logits.astype(np.float64) / temperature  # (B, V)
    V = z.shape[1]
    if 0 < top_k < V:
        kth = np.partition(z, V - top_k, axis=1)[:, V - top_k, None]  # (B, 1) k-th largest
        z = np.where(z >= kth, z, -np.inf)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=1, kind="stable")  # (B, V) most likely first
        sorted_p = np.take_along_axis(p, order, axis=1)
        # keep a character while the mass of the more likely ones is still below top_p
        keep_sorted = np.cumsum(sorted_p, axis=1) - sorted_p < top_p
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=1, keepdims=True)
    return p


def draw(
    logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """One character id per row of logits (B, V) -> (B,)."""
    u = rng.random(len(logits)) if temperature != 0 else None  # (B,)
    return draw_with(logits, u, temperature, top_k, top_p)


def draw_with(
    logits: np.ndarray, u: np.ndarray | None, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """`draw` with its uniform numbers given: u (B,) in [0, 1), None at temperature 0. A row's
    character depends on its own logits and u only."""
    if temperature == 0:
        return logits.argmax(axis=1)
    p = next_char_probs(logits, temperature, top_k, top_p)
    cdf = np.cumsum(p, axis=1)  # (B, V)
    return np.minimum((cdf <= u[:, None] * cdf[:, -1:]).sum(axis=1), p.shape[1] - 1)


def encode_seed(vocab: Vocab, seed: str, skip_unknown: bool = False) -> np.ndarray:
    ids, n_unknown = vocab.encode(seed, unknown="skip")
    if n_unknown and not skip_unknown:
        raise VocabError(
            f"--seed holds {describe_unknown(vocab.unknown_chars(seed))} not in the model's"
            " vocabulary (use --skip-unknown to drop them)"
        )
    return ids.astype(np.int64)


def generate(
    model: CharRNN,
    seed_ids: np.ndarray,
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    rng: np.random.Generator | None = None,
) -> Iterator[np.ndarray]:
    """Yields the next character id of every stream, (num_samples,), `length` times."""
    rng = rng if rng is not None else np.random.default_rng()
    state = model.zero_state(num_samples)
    if len(seed_ids):
        x = np.repeat(seed_ids[:, None], num_samples, axis=1)  # (T, B)
        logits, state, _ = model.forward(x, state)
        logits = logits[-num_samples:]  # (B, V) after the last seed character
    else:  # nothing to prime on: the zero state's prediction, softmax(head.bias)
        logits = np.broadcast_to(model.params["head.bias"], (num_samples, model.shape.vocab_size))
    stepper = model.stepper()
    groups = stepper.groups(num_samples)
    if len(groups) > 1:
        yield from _generate_in_groups(stepper, groups, logits, state, length, rng,
                                       (temperature, top_k, top_p))
        return
    for n in range(length):
        ids = draw(logits, rng, temperature, top_k, top_p)  # (B,)
        yield ids
        if n + 1 < length:
            logits, state = stepper.step_here(ids, state)  # one group: no split to decide


GROUP_STEPS = 32  # steps each group of streams makes between two hand-offs


def _generate_in_groups(stepper: Stepper, groups: list[slice], logits: np.ndarray,
                        state: list, length: int, rng: np.random.Generator,
                        how: tuple[float, int, float]) -> Iterator[np.ndarray]:
    """`generate` for a batch big enough for several threads. The streams never interact,
    so each group of them (a thread's) makes GROUP_STEPS steps on its own before the
    threads meet, instead of meeting at every step (a hand-off costs about 0.2 ms, and a
    step of 32 lstm-512 streams 1.5 ms). The uniform numbers of those steps are drawn
    first, all streams at once, as `draw` would draw them step by step; a row's character
    depends only on its own logits and number (`draw_with`), so the characters are the
    ungrouped loop's exactly.

        steps     n0 ........ n0 + GROUP_STEPS - 1 | n0 + GROUP_STEPS ...
        group 0   draw, step, draw, step, ...       | ...
        group 1   draw, step, draw, step, ...       | ...
                                            meet, yield the chunk's rows in order
    """
    temperature = how[0]
    B = len(logits)
    heads = [logits[g] for g in groups]  # each group's next-character logits
    states = [columns(state, g) for g in groups]

    def run(g: int, u: np.ndarray | None, n: int, last: bool) -> np.ndarray:
        out = np.empty((n, groups[g].stop - groups[g].start), np.int64)
        for s in range(n):
            out[s] = draw_with(heads[g], None if u is None else u[s, groups[g]], *how)
            if not (last and s == n - 1):  # as generate: no step after the last character
                heads[g], states[g] = stepper.step_here(out[s], states[g])
        return out

    for n0 in range(0, length, GROUP_STEPS):
        n = min(GROUP_STEPS, length - n0)
        u = rng.random((n, B)) if temperature != 0 else None  # (n, B): n draws of B, in order
        last = n0 + n == length
        chunk = run_groups(lambda g, u=u, n=n, last=last: run(g, u, n, last), len(groups))
        yield from np.concatenate(chunk, axis=1)  # (n, B), a row per step


def sample_text(
    model: CharRNN,
    vocab: Vocab,
    seed: str,
    length: int,
    *,
    on_chars: Callable[[list[str]], None] | None = None,
    skip_unknown: bool = False,
    rng_seed: int | None = None,
    **kwargs,
) -> list[str]:
    """The seed plus `length` generated characters, for each of `num_samples` streams.

    `on_chars` receives each step's characters (one per stream) as they are drawn."""
    seed_ids = encode_seed(vocab, seed, skip_unknown)
    rng = np.random.default_rng(rng_seed)
    chars = np.array(vocab.chars, dtype=object)
    texts: list[list[str]] = [[] for _ in range(kwargs.get("num_samples", 1))]
    for ids in generate(model, seed_ids, length, rng=rng, **kwargs):
        step_chars = chars[ids].tolist()
        for text, ch in zip(texts, step_chars, strict=True):
            text.append(ch)
        if on_chars is not None:
            on_chars(step_chars)
    return [seed + "".join(t) for t in texts]
