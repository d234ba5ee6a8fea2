"""`train.max_minutes`: a wall-clock budget turned into a fixed number of steps.

The learning-rate schedule needs to know where training ends, so a time budget is turned
into a step count once, from the speed of the first steps, and then kept:

    step   1    2 ........ m                                  planned
           |warm| measured  |  fixed schedule over `planned` steps  |
    time   0                                                  deadline
                              evaluations and checkpoints included

- Step 1 (allocations, first touches of the buffers) is not measured.
- Steps 2..m are, until they have taken MEASURE_SECONDS (or MEASURE_FRACTION of the budget,
  the smaller), and at least MIN_MEASURED steps.
- Until the plan is fixed, the schedule runs with no end in sight: a cosine stays at its
  starting rate (after any warm-up), the other schedules do not depend on the end.
- The speed is the median of those steps' times: a step slowed by another program (or a
  page fault) does not shorten the plan.
- planned = steps so far + what fits in the time left at the measured seconds per step, with
  the measured cost of an evaluation spread over `eval_every` steps, and one evaluation kept
  back for the end. It is recorded in the checkpoint, so a resumed run keeps the schedule.
- Whatever the plan, a step that would end past the deadline is not started: the run then
  stops within one step of the budget, with its final evaluation and checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MEASURE_SECONDS = 30.0
MEASURE_FRACTION = 0.02  # of the budget, when that is shorter than MEASURE_SECONDS
MIN_MEASURED = 3
SAFETY = 0.97  # of the time left: a machine slower later than at the start (seen here: 5%)


@dataclass
class TimeBudget:
    """The budget of one run, and (once measured) the steps that fit in it."""

    minutes: float
    max_steps: int  # train.max_steps: a cap on the plan
    eval_every: int
    planned_steps: int | None = None  # fixed once measured; saved in checkpoints
    seconds_per_step: float | None = None
    _first: tuple[int, float] | None = None  # (step, elapsed) where measuring began
    _last: tuple[int, float] | None = None  # the latest step measured
    _times: list[float] | None = None  # seconds per step of the measured steps

    @property
    def seconds(self) -> float:
        return 60.0 * self.minutes

    def horizon(self) -> float:
        """The step count the schedule spans: the plan, or no end before it is made."""
        return self.planned_steps if self.planned_steps is not None else math.inf

    def measured(self, step: int, elapsed: float) -> bool:
        """Records a finished step (`elapsed` seconds into the run); True once the steps so
        far give a speed to plan with."""
        if self.planned_steps is not None:
            return False
        if self._first is None:
            self._first = self._last = (step, elapsed)  # the end of the warm-up step
            self._times = []
            return False
        last_step, last_t = self._last
        if step > last_step:  # one or more steps since the last call (a skipped one too)
            self._times.extend([(elapsed - last_t) / (step - last_step)] * (step - last_step))
        self._last = (step, elapsed)
        step0, t0 = self._first
        n, took = step - step0, elapsed - t0
        enough_time = took >= min(MEASURE_SECONDS, MEASURE_FRACTION * self.seconds)
        return n >= MIN_MEASURED and enough_time

    def plan(self, step: int, elapsed: float, eval_seconds: float) -> int:
        """Fixes planned_steps from the measured speed and the cost of one evaluation."""
        if self._times:
            self.seconds_per_step = float(np.median(self._times))
        else:  # planned before any step was measured (tests)
            step0, t0 = self._first or (0, 0.0)
            self.seconds_per_step = (elapsed - t0) / max(1, step - step0)
        per_step = self.seconds_per_step + eval_seconds / self.eval_every
        left = SAFETY * (self.seconds - elapsed) - eval_seconds  # the final evaluation
        fit = int(max(0.0, left) // per_step) if per_step > 0 else self.max_steps
        self.planned_steps = max(step + 1, min(self.max_steps, step + fit))
        return self.planned_steps

    def expired(self, elapsed: float) -> bool:
        """True when the next step would end past the deadline."""
        per_step = self.seconds_per_step or 0.0
        return elapsed + per_step > self.seconds

    def state_dict(self) -> dict:
        return {"minutes": self.minutes, "planned_steps": self.planned_steps,
                "seconds_per_step": self.seconds_per_step}

    def load_state_dict(self, state: dict | None) -> None:
        """Takes a checkpoint's plan when it was made for the same budget."""
        if not state or state.get("minutes") != self.minutes:
            return
        self.planned_steps = state.get("planned_steps")
        self.seconds_per_step = state.get("seconds_per_step")
