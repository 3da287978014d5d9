"""The one error every layer of a run raises for a job that cannot go on as asked."""

from __future__ import annotations


class JobFatal(Exception):
    """Exit 2: the job cannot run or finish as asked; the message says what to fix."""
