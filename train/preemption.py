"""Stop cleanly when asked: SIGUSR1 (SLURM's warning before the time limit, `--signal=USR1@300`)
or SIGTERM (preemption, scancel, torchrun forwarding its own SIGTERM to the workers).

    stop = StopRequest().install()        # in the main thread, before training
    ...
    if stop.agreed(coll):                 # every step: one small all-reduce
        checkpoint(); raise Preempted(...)

The handler only records the signal; the trainer acts at the next step boundary, where every
rank is at the same step. The ranks agree by an all-reduce (max), so a signal that reached one
rank stops all of them at the same step and their collective checkpoint matches. Repeats are
the same request: at a hard time limit SLURM signals every process of the job, and under
torchrun a worker hears it from SLURM and again from torchrun's agent, in the same second; the
cluster's KillWait (often 30 s) is the time the checkpoint has. To stop at once without a
checkpoint, use SIGINT (Ctrl-C) or SIGKILL.
"""
from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: checkpointed on a signal; `--resume latest` continues
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(RuntimeError):
    """The run checkpointed after a stop signal and ends; `--resume latest` continues it."""


class StopRequest:
    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self, coll) -> int:
        """The signal number any rank received (0: none), the same on every rank. Collective."""
        return int(coll.max(self.signum)) if coll.distributed else self.signum

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name if signum else ""
