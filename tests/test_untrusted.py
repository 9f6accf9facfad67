"""Every document is untrusted input: one malformed document never stops the run, the status,
the console or the release; it is named as a problem of its own client.

Each case was reproduced on the code before part three (a 500 on every status GET, a run that
crashed before releasing its lock, a job down until someone deleted a document); the last test
writes random wrong types into every field the code reads and checks the invariants after a
tick.
"""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest
from conftest import ROOT, run_once, seed_clients
from functions_framework import create_app
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared.resume.plan import DECISION_FIELDS

PIPE = (
    '[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:ok"\n'
    '[[operation]]\nname = "second"\nkind = "python"\ntarget = "opfuncs:ok"\n'
)


def secret() -> dict[str, str]:
    return {"X-Webhook-Secret": os.environ["SMART_RESUME_WEBHOOK_SECRET"].split(",")[0]}


def status_app():
    source = str(ROOT / "functions" / "smart_resume_status" / "main.py")
    return create_app("smart_resume_status", source).test_client()


def get(app, query: str = ""):
    return app.get("/" + query, headers={**secret(), "Accept": "application/json"})


def record(db, run_id: str) -> dict:
    return db.document(f"runs/{run_id}").get().to_dict() or {}


def assert_finished_cleanly(db, out, processed_clients: list[str]) -> None:
    """The run ended with a status, released its lock, claimed its one report, and every
    healthy client's operations ran."""
    assert out.status in ("completed", "partial"), out.body
    lock = db.document("locks/smart-resume").get().to_dict()
    assert lock["held"] is False
    rec = record(db, out.run_id)
    assert rec["status"] == out.status
    assert rec["report"]["status"] in ("sent", "skipped")
    done = {(r["clientId"], r["operation"]) for r in rec["results"] if r["outcome"] == "processed"}
    for client_id in processed_clients:
        assert {(client_id, "first"), (client_id, "second")} <= done, client_id


class TestPoisonedClientDocument:
    def test_wrong_failing_map_breaks_nothing(self, db, configure, pipeline_file):
        """`{failingCount: 1, failing: "x"}`: status, health, the console and the run all
        answer; the run releases and reports (before: 500 everywhere, the lock stranded)."""
        pipeline_file(PIPE)
        settings = configure()
        healthy = seed_clients(db, 3)
        db.document("clients/poison").set({"failingCount": 1, "failing": "x"})
        out = run_once(settings, db)
        assert_finished_cleanly(db, out, healthy)
        app = status_app()
        assert get(app).status_code == 200
        assert get(app, "?check=health").status_code in (200, 503)
        assert get(app, "?clients=50").status_code == 200
        retry = app.post(
            "/", data=json.dumps({"action": "retry", "clientId": "poison"}), headers=secret()
        )
        assert retry.status_code == 200, retry.get_data(as_text=True)

    def test_counts_of_the_wrong_type_fail_nobody(self, db, configure, pipeline_file):
        """A partial state with `counts: {"leads_scored": "x"}` (before: every run failed for
        every client): the operation resumes with the bad count dropped, the others run, and
        the state's problem is listed until fixed."""
        pipeline_file(PIPE)
        settings = configure()
        healthy = seed_clients(db, 3)
        seed_clients(db, 1, prefix="bad")
        db.document("clients/bad00000/operations/first").set(
            {"status": "partial", "checkpoint": {"page": 2}, "counts": {"leads_scored": "x"}}
        )
        out = run_once(settings, db)
        assert_finished_cleanly(db, out, [*healthy, "bad00000"])
        body = get(status_app()).get_json()
        assert [(p["clientId"], p["operation"], p["field"]) for p in body["problems"]] == [
            ("bad00000", "first", "counts")
        ]
        assert "leads_scored" in body["problems"][0]["problem"]
        assert any("cannot use" in r for r in body["health"]["reasons"])
        assert body["health"]["state"] == "ok"  # data to fix is named, not an alarm

    def test_checkpoint_of_the_wrong_type_skips_that_operation_only(
        self, db, configure, pipeline_file
    ):
        pipeline_file(PIPE)
        settings = configure()
        healthy = seed_clients(db, 2)
        seed_clients(db, 1, prefix="bad")
        db.document("clients/bad00000/operations/first").set(
            {"status": "partial", "checkpoint": "page-2"}
        )
        out = run_once(settings, db)
        assert_finished_cleanly(db, out, healthy)
        rows = {(r["clientId"], r["operation"]): r for r in record(db, out.run_id)["results"]}
        assert rows[("bad00000", "first")]["outcome"] == "skipped"
        assert "checkpoint is not a map" in rows[("bad00000", "first")]["reason"]
        assert rows[("bad00000", "second")]["reason"].startswith("blocked")
        problems = get(status_app()).get_json()["problems"]
        assert [(p["clientId"], p["field"]) for p in problems] == [("bad00000", "checkpoint")]


class TestFailingWorkListing:
    def test_fractional_counts_on_inactive_documents_hide_nothing(
        self, db, configure, pipeline_file
    ):
        """500 inactive documents with `failingCount: 0.5` and a fake `failing` map (before:
        they filled the 500-entry listing, and the fake map made health `failing`)."""
        pipeline_file(PIPE)
        settings = configure()
        batch = db.batch()
        for i in range(500):
            fake = {"first": {"state": "quarantined", "failures": 9}}
            data = {"active": False, "failingCount": 0.5, "quarantinedCount": 0.5}
            batch.set(db.document(f"clients/fake{i:04d}"), {**data, "failing": fake})
            if i % 400 == 399:
                batch.commit()
                batch = db.batch()
        batch.commit()
        db.document("clients/zz-inactive").set(
            {
                "active": False,
                "failingCount": 1,
                "quarantinedCount": 1,
                "failing": {"first": {"state": "quarantined", "failures": 6}},
            }
        )
        now = dt.datetime.now(dt.UTC)
        db.document("clients/real").set({"name": "Real", "active": True})
        db.document("clients/real/operations/first").set(
            {"status": "quarantined", "failures": 6, "finishedAt": now, "quarantinedAt": now}
        )
        run_once(settings, db)  # its full pass writes the real client's failing summary
        body = get(status_app()).get_json()
        assert [(q["clientId"], q["operation"]) for q in body["quarantined"]] == [("real", "first")]
        assert body["health"]["state"] == "failing"
        assert all("fake" not in r and "zz-inactive" not in r for r in body["health"]["reasons"])


class TestClientsThatNeverRun:
    @pytest.mark.parametrize(
        ("fields", "field", "words"),
        [
            ({"active": "true"}, "active", "'active' is string, not a boolean"),
            ({"active": True, "operations": ["enrihc"]}, "operations", "'enrihc'"),
            ({"active": True, "operations": "first"}, "operations", "not a list"),
            ({"active": True, "name": ["x"]}, "name", "'name' is list, not a string"),
        ],
    )
    def test_named_as_a_problem(self, db, configure, pipeline_file, fields, field, words):
        """Before: such a client silently never ran, and health stayed OK."""
        pipeline_file(PIPE)
        settings = configure()
        seed_clients(db, 2)
        db.document("clients/odd").set({"name": "Odd", **fields})
        out = run_once(settings, db)  # the first tick runs a full pass over every document
        assert out.status == "completed"
        body = get(status_app()).get_json()
        found = [p for p in body["problems"] if p["clientId"] == "odd"]
        assert [p["field"] for p in found] == [field]
        assert words in found[0]["problem"]
        assert any("cannot use" in r for r in body["health"]["reasons"])

    def test_a_fixed_document_leaves_the_list(self, db, configure, pipeline_file):
        pipeline_file(PIPE)
        settings = configure(SMART_RESUME_RECONCILE_HOURS="1000")
        seed_clients(db, 1)
        db.document("clients/odd").set({"name": "Odd", "active": True, "operations": ["nope"]})
        run_once(settings, db)
        assert get(status_app()).get_json()["problems"]
        db.document("clients/odd").update({"operations": ["first"], "nextDueAt": None})
        out = run_once(settings, db, client_id="odd")
        assert out.body["summary"]["processed"] == 1
        assert get(status_app()).get_json()["problems"] == []


class TestBounds:
    def test_huge_documents_give_bounded_answers_and_logs(
        self, db, configure, pipeline_file, capsys
    ):
        """Ten clients with 5,000-entry `failing` maps (before: an 11 MB status answer), a
        client listing 4,500 unknown operations (before: 4,505 log lines a tick), and a name
        of 100,000 characters (before: returned whole)."""
        pipeline_file(PIPE)
        settings = configure()
        big = {
            f"op{i}": {"state": "backoff", "failures": 2, "error": "E" * 100} for i in range(5000)
        }
        for i in range(10):
            db.document(f"clients/big{i}").set(
                {"name": "Big", "active": True, "failingCount": 5000, "failing": big}
            )
        db.document("clients/many").set(
            {"name": "N" * 100_000, "active": True, "operations": [f"x{i}" for i in range(4500)]}
        )
        out = run_once(settings, db)
        assert out.status == "completed"
        logged = capsys.readouterr().out
        assert logged.count("the pipeline lacks") <= 1
        assert len(json.dumps(record(db, out.run_id)["results"])) < 20_000
        app = status_app()
        answer = get(app)
        assert answer.status_code == 200 and len(answer.data) < 200_000
        listing = get(app, "?clients=50").get_json()
        many = next(c for c in listing["clients"] if c["clientId"] == "many")
        assert len(many["name"]) <= 200
        found = [p for p in answer.get_json()["problems"] if p["clientId"] == "many"]
        assert "4500 operation(s) the pipeline lacks" in found[0]["problem"]
        assert len(found[0]["problem"]) < 400


# -- generated: random wrong types in every field the code reads -------------------------------

CLIENT_FIELDS = [
    "name",
    "active",
    "stream",
    "operations",
    "nextDueAt",
    "failing",
    "failingCount",
    "quarantinedCount",
    "shard",
    "claim",
    "problems",
    "problemCount",
]
#: What deciding reads of a state (the engine's own list), and what a step loads besides.
STATE_FIELDS = [*DECISION_FIELDS, "counts", "checkpoint", "runId"]
LOCK_FIELDS = ["held", "runId", "token", "acquiredAt", "heartbeatAt", "progress", "owner"]
RUN_FIELDS = ["status", "summary", "error", "startedAt", "finishedAt", "results", "report"]

keys = st.text(min_size=1, max_size=8).filter(lambda k: "__" not in k)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.datetimes(timezones=st.just(dt.UTC))
)
maps = st.dictionaries(keys, leaves | st.lists(leaves, max_size=3), max_size=4)
# Firestore holds no array directly inside an array: lists hold leaves and maps only.
values = leaves | maps | st.lists(leaves | maps, max_size=4)
TRIED = {"documents": 0, "runs": 0, "crashes": 0}


@pytest.mark.slow
@hsettings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    client=st.dictionaries(st.sampled_from(CLIENT_FIELDS), values, max_size=5),
    state=st.dictionaries(st.sampled_from(STATE_FIELDS), values, max_size=5),
    lock=st.dictionaries(st.sampled_from(LOCK_FIELDS), values, max_size=3),
    old_run=st.dictionaries(st.sampled_from(RUN_FIELDS), values, max_size=4),
)
def test_random_wrong_types_never_stop_the_job(
    db, configure, pipeline_file, emulator, client, state, lock, old_run
):
    """A document of random shape in a client, an operation state, the lock and a run record:
    the other clients run, the lock is released, the run gets one report, status answers 200."""
    emulator.clear()
    pipeline_file(PIPE)
    settings = configure()
    healthy = seed_clients(db, 2)
    db.document("clients/zz-random").set(client)
    db.document("clients/c00000/operations/second").set(state)
    db.document("clients/zz-random/operations/first").set(state)
    if lock:
        db.document("locks/other").set(lock)
    db.document("runs/20000101-000000-aaaaaa").set({"lockName": "smart-resume", **old_run})
    TRIED["documents"] += 5
    out = run_once(settings, db)
    TRIED["runs"] += 1
    lock_after = db.document("locks/smart-resume").get().to_dict()
    assert lock_after["held"] is False
    rec = record(db, out.run_id)
    assert rec["status"] == out.status and out.status in ("completed", "partial"), out.body
    assert rec["report"]["status"] in ("sent", "skipped")
    done = {(r["clientId"], r["operation"]) for r in rec["results"] if r["outcome"] == "processed"}
    assert ("c00001", "first") in done and ("c00001", "second") in done, healthy
    app = status_app()
    for query in ("", "?check=health", "?clients=50", "?runs=5"):
        assert get(app, query).status_code in (200, 503), query
    print(f"FIGURE untrusted: documents={TRIED['documents']}, runs={TRIED['runs']}, crashes=0")


def test_the_report_names_the_problems(db, configure, pipeline_file, tmp_path):
    """The report of a run that met a malformed document lists it (and is headed as needing
    attention, whatever its status)."""
    pipeline_file(PIPE)
    settings = configure(
        SMART_RESUME_EMAIL_TRANSPORT="outbox", SMART_RESUME_OUTBOX=str(tmp_path / "out")
    )
    seed_clients(db, 1)
    db.document("clients/odd").set({"name": "Odd", "active": True, "operations": ["enrihc"]})
    out = run_once(settings, db)
    assert out.status == "completed"
    html = (tmp_path / "out" / f"{out.run_id}.html").read_text()
    assert "enrihc" in html and "odd" in html
