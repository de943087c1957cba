"""Test-side twin of `neuron.worker.Worker._confirm_subscriptions`."""

from __future__ import annotations

from nats.aio.client import Client


async def confirm_subscriptions(nc: Client) -> None:
    """Return once the server has every subscription ``nc`` made so far.

    nats-py writes a flush's PING ahead of SUBs still queued for its flusher task, so a single
    flush can return before the server has them; two round trips cannot.
    """
    await nc.flush()
    await nc.flush()
