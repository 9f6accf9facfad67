"""The harness itself: the emulator answers, and tests do not see each other's data."""

from __future__ import annotations

import os

from conftest import PROJECT


def test_round_trip_through_the_real_client(db) -> None:
    """A write through google.cloud.firestore reads back from the emulator."""
    db.collection("probe").document("a").set({"n": 1})
    assert db.collection("probe").document("a").get().to_dict() == {"n": 1}
    assert os.environ["GOOGLE_CLOUD_PROJECT"] == PROJECT


def test_isolation_first(db) -> None:
    db.collection("probe").document("isolated").set({"n": 1})
    assert len(list(db.collection("probe").stream())) == 1


def test_isolation_second(db) -> None:
    """Data written by the test before is gone."""
    db.collection("probe").document("other").set({"n": 2})
    assert [d.id for d in db.collection("probe").stream()] == ["other"]


def test_one_client_per_process(settings) -> None:
    """A warm instance reuses its client and channel: each request asking for the store gets
    the same client (a new one per request would cost a channel and its handshake)."""
    from shared.store import get_client

    assert get_client(settings) is get_client(settings)
