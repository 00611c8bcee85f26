"""Dask schedulers of ``label --scheduler``: see :mod:`ovstore.cluster` (shared with ``maps``)."""

from ..cluster import CONNECT_TIMEOUT, SchedulerUnreachableError, check_scheduler_address, connect_scheduler

__all__ = ["CONNECT_TIMEOUT", "SchedulerUnreachableError", "check_scheduler_address", "connect_scheduler"]
