"""Optimizers, learning-rate schedules and global-norm clipping.

Every optimizer updates the parameter arrays in place, keeps its moments in arrays of
the parameters' dtype (saved in checkpoints for exact resume) and allocates nothing per
step beyond one scratch array per parameter.
"""

from __future__ import annotations

import math

import numpy as np

Params = dict[str, np.ndarray]

RMSPROP_ALPHA = 0.99  # running-average decay of squared gradients, PyTorch's default


def clip_by_global_norm_(grads: Params, max_norm: float) -> float:
    """Scales `grads` in place so that their joint L2 norm is at most `max_norm` (0: off).

    Returns the norm before clipping (inf/nan when a gradient is not finite)."""
    norm = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads.values()))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm


def learning_rate(
    step: int,
    *,
    base_lr: float,
    schedule: str,
    max_steps: int,
    warmup_steps: int = 0,
    decay: float = 0.5,
    decay_every: int = 1000,
    lr_min: float = 0.0,
) -> float:
    """The learning rate for update number `step` (0-based).

    Linear warm-up over the first `warmup_steps`, then: constant; step (x decay every
    `decay_every` steps); exponential (x decay per `decay_every` steps, smoothly);
    cosine from base_lr down to lr_min at max_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    s = step - warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * decay ** (s // decay_every)
    if schedule == "exponential":
        return base_lr * decay ** (s / decay_every)
    if schedule == "cosine":
        progress = min(1.0, s / max(1, max_steps - warmup_steps))
        return lr_min + (base_lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


class Optimizer:
    """sgd | momentum | rmsprop | adagrad | adam | adamw, in PyTorch's formulations."""

    MOMENTS = {
        "sgd": (),
        "momentum": ("velocity",),
        "rmsprop": ("square_avg",),
        "adagrad": ("sum_sq",),
        "adam": ("m", "v"),
        "adamw": ("m", "v"),
    }

    def __init__(
        self,
        name: str,
        params: Params,
        *,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        if name not in self.MOMENTS:
            raise ValueError(f"unknown optimizer {name!r}")
        self.name = name
        self.momentum, self.beta1, self.beta2, self.eps = momentum, beta1, beta2, eps
        self.weight_decay = weight_decay
        self.t = 0  # updates taken, for Adam's bias correction
        self.state: dict[str, Params] = {
            m: {k: np.zeros_like(p) for k, p in params.items()} for m in self.MOMENTS[name]
        }
        self._scratch = {k: np.empty_like(p) for k, p in params.items()}

    def step(self, params: Params, grads: Params, lr: float) -> None:
        self.t += 1
        for k, p in params.items():
            g, tmp = grads[k], self._scratch[k]
            if self.name == "sgd":
                np.multiply(g, lr, out=tmp)
            elif self.name == "momentum":
                v = self.state["velocity"][k]
                v *= self.momentum
                v += g
                np.multiply(v, lr, out=tmp)
            elif self.name in ("rmsprop", "adagrad"):
                if self.name == "rmsprop":
                    acc = self.state["square_avg"][k]
                    acc *= RMSPROP_ALPHA
                    np.multiply(g, g, out=tmp)
                    tmp *= 1.0 - RMSPROP_ALPHA
                else:
                    acc = self.state["sum_sq"][k]
                    np.multiply(g, g, out=tmp)
                acc += tmp
                np.sqrt(acc, out=tmp)
                tmp += self.eps
                np.divide(g, tmp, out=tmp)
                tmp *= lr
            else:  # adam, adamw
                m, v = self.state["m"][k], self.state["v"][k]
                m *= self.beta1
                np.multiply(g, 1.0 - self.beta1, out=tmp)
                m += tmp
                v *= self.beta2
                np.multiply(g, g, out=tmp)
                tmp *= 1.0 - self.beta2
                v += tmp
                # p -= lr * m_hat / (sqrt(v_hat) + eps)
                bc1 = 1.0 - self.beta1**self.t
                bc2 = 1.0 - self.beta2**self.t
                np.sqrt(v, out=tmp)
                tmp *= 1.0 / math.sqrt(bc2)
                tmp += self.eps
                np.divide(m, tmp, out=tmp)
                tmp *= lr / bc1
                if self.name == "adamw":
                    p *= 1.0 - lr * self.weight_decay
            p -= tmp

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {f"{m}.{k}": a for m, arrs in self.state.items() for k, a in arrs.items()}
        out["t"] = np.array([self.t], dtype=np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for m, arrs in self.state.items():
            for k, a in arrs.items():
                src = state[f"{m}.{k}"]
                if src.shape != a.shape:
                    raise ValueError(f"optimizer state {m}.{k}: shape {src.shape}, not {a.shape}")
                a[...] = src
        self.t = int(np.asarray(state["t"]).reshape(-1)[0])


class WeightAverage:
    """An exponential moving average of the parameters, updated after every optimizer step:

        decay_t = min(decay, (1 + t) / (10 + t))      t = updates so far (0 first)
        avg    <- decay_t * avg + (1 - decay_t) * params

    The ramp on decay_t (TensorFlow's ExponentialMovingAverage with num_updates) keeps the
    average from dwelling on the initial weights: with decay 0.999 and no ramp, the random
    initialisation would still weigh e^-1 after 1000 steps. The average starts as a copy of
    the parameters and never feeds back into training."""

    def __init__(self, params: Params, decay: float):
        self.decay = decay
        self.params: Params = {k: p.copy() for k, p in params.items()}
        self.updates = 0

    def rate(self) -> float:
        """decay_t of the next update."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    def update(self, params: Params) -> None:
        d = self.rate()
        for k, avg in self.params.items():
            # the same as d * avg + (1 - d) * p, with the rounding of an increment
            avg += (params[k] - avg) * avg.dtype.type(1.0 - d)
        self.updates += 1
