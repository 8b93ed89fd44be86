"""Live: the real-time risk processor and the pre-trade check (DESIGN.md §7).

=======================  ===========================================================
:class:`Processor`       follows the store from a checkpoint kept in PostgreSQL and
                         appends violations and blocks, exactly once
:class:`Engine`          the processor's fold with no I/O: batches in, effects out
:func:`check`            accept or reject a proposed trade, with every reason
:func:`unblock`          append AccountUnblocked for a blocked account: who and why
:func:`processors`       the store's processors: checkpoint, lag, working, snapshot
=======================  ===========================================================

The processor is the article's stream processor with PostgreSQL as the log: it reads
the store in global order (never skipping an event: see :mod:`riskbook.store`), folds
each micro-batch with the same limit definitions and breach fold as
:func:`riskbook.breaches`, and commits what it decides -- LimitViolationDetected once
per breach start, AccountBlocked for a critical breach -- with its checkpoint in one
transaction.
"""

from riskbook.live._check import CheckResult, Reason, check, unblock
from riskbook.live._engine import DEFAULT_CRITICAL, Effect, Engine
from riskbook.live._processor import Commit, Processor
from riskbook.live._status import processors

__all__ = [
    "DEFAULT_CRITICAL",
    "CheckResult",
    "Commit",
    "Effect",
    "Engine",
    "Processor",
    "Reason",
    "check",
    "processors",
    "unblock",
]
