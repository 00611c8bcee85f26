"""Dask schedulers of the jobs that run on a cluster (``label``, ``maps --scheduler``): an
address is checked, then connected to with a short timeout, before anything is written (a
mistyped address used to end in a traceback, an unreachable one in a 30-second wait and a
traceback); ``local`` is a LocalCluster sized to the machine."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .errors import InvalidInputError, OvstoreError

__all__ = ["CONNECT_TIMEOUT", "SchedulerUnreachableError", "check_scheduler_address", "connect_scheduler", "dask_client"]

#: seconds to wait for a scheduler to answer
CONNECT_TIMEOUT = 5.0

_FORM = "write tcp://HOST:PORT (a dask scheduler listens on 8786 by default), or 'synchronous' to run in this process"


class SchedulerUnreachableError(OvstoreError):
    """No Dask scheduler answered at the given address."""


def check_scheduler_address(address: str) -> str:
    """``address`` as Dask takes it (``PROTOCOL://HOST:PORT``; a bare ``HOST:PORT`` is tcp), or
    an :class:`InvalidInputError` naming what is wrong and the form to write."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    text = address.strip()
    protocol, location = parse_address(text, strict=False) if text else ("tcp", "")
    if protocol not in registry.backends:
        raise InvalidInputError(f"--scheduler {address!r}: protocol {protocol!r} is not one of "
                                f"{', '.join(sorted(registry.backends))}; {_FORM}")
    if protocol == "inproc":
        return text
    try:
        host, port = parse_host_port(location)
    except ValueError:
        host, port = "", None
    if not host or port is None or not 1 <= int(port) <= 65535:
        raise InvalidInputError(f"--scheduler {address!r} is not a scheduler address; {_FORM}")
    return text if "://" in text else f"tcp://{text}"


def connect_scheduler(address: str, timeout: float | None = None) -> Any:
    """A ``distributed.Client`` connected to ``address`` within ``timeout`` seconds (default
    :data:`CONNECT_TIMEOUT`), or one line naming the address and what to do."""
    from distributed import Client

    address = check_scheduler_address(address)
    seconds = CONNECT_TIMEOUT if timeout is None else timeout
    try:
        return Client(address, timeout=f"{seconds}s")
    except (OSError, TimeoutError) as exc:
        raise SchedulerUnreachableError(
            f"no Dask scheduler answered at {address} within {seconds:g} s ({exc}); start one there "
            "(`dask scheduler`, and workers with `dask worker ADDRESS`), check the address, or leave "
            "--scheduler out to use a local cluster; nothing was written"
        ) from None


def dask_client(scheduler: Any, workers: int | None = None) -> tuple[Any, Callable[[], None]]:
    """A Dask client and the function that closes what was opened for it: ``scheduler`` an
    existing ``distributed.Client`` (kept open), an address (connected to), or ``None`` /
    ``"local"``: a LocalCluster of ``workers`` processes (default: one per core), one thread
    each, since every task runs its own torch work."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, lambda: None
    if isinstance(scheduler, str) and scheduler != "local":
        client = connect_scheduler(scheduler)
        return client, client.close
    cluster = LocalCluster(n_workers=workers or max(1, (os.cpu_count() or 2)), threads_per_worker=1,
                           processes=True, dashboard_address=None)
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close
