"""Demo data: a few clients, each with leads to score (`python -m shared.resume seed-demo`)."""

from __future__ import annotations

import random

from google.cloud import firestore

from shared import store
from shared.config import Settings

NAMES = [
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella Health",
    "Hooli",
    "Stark Industries",
    "Wayne Enterprises",
    "Soylent",
    "Cyberdyne",
    "Tyrell",
]


def seed_demo(
    client: firestore.Client, settings: Settings, clients: int, leads: int, delay: float
) -> int:
    """Write `clients` active demo clients (and one inactive) with `leads` leads each."""
    rng = random.Random(42)
    call = store.commit_call(settings)
    written = 0
    for index in range(clients):
        client_id = f"demo-{index + 1:02d}"
        ref = client.collection(store.CLIENTS).document(client_id)
        ref.set(
            {
                "name": NAMES[index % len(NAMES)],
                "active": True,
                "stream": 0,
                "demoDelaySeconds": delay,
            },
            **call,
        )
        batch = client.batch()
        for n in range(leads):
            batch.set(
                ref.collection("leads").document(f"lead-{n:04d}"),
                {"employees": rng.randint(1, 900), "visits": rng.randint(0, 12)},
            )
            written += 1
            if n % 400 == 399:
                batch.commit(**call)
                batch = client.batch()
        batch.commit(**call)
    client.collection(store.CLIENTS).document("demo-inactive").set(
        {"name": "Dormant Ltd", "active": False}, **call
    )
    return written
