"""The console through `functions_framework.create_app`: the page a
browser gets, its Content-Security-Policy, and the `?clients=N[&after=ID]` listing."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re

import pytest
from conftest import ROOT, seed_clients
from functions_framework import create_app

from shared import console

SOURCE = str(ROOT / "functions" / "smart_resume_status" / "main.py")
SECRET = {"X-Webhook-Secret": "test-secret-2-0123456"}
#: What Chromium sends for a page load.
BROWSER = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
PIPELINE = """
quarantine_after = 2
retry_backoff_seconds = 600

[[operation]]
name = "first"
kind = "python"
target = "opfuncs:ok"

[[operation]]
name = "second"
kind = "python"
target = "opfuncs:ok"
"""


@pytest.fixture
def status_fn():
    return create_app(target="smart_resume_status", source=SOURCE).test_client()


def page_of(status_fn, path: str = "/", **headers: str):
    return status_fn.get(path, headers={"Accept": BROWSER, **headers})


def listing(status_fn, query: str) -> dict:
    response = status_fn.get(f"/?{query}", headers=SECRET)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def state(db, client_id: str, operation: str, **fields) -> None:
    db.document(f"clients/{client_id}/operations/{operation}").set(fields)


class TestPage:
    @pytest.mark.parametrize("secret", [None, "wrong", "test-secret-1-0123456"])
    def test_a_browser_gets_the_page_whatever_the_secret(self, status_fn, secret) -> None:
        """A browser's GET is answered with the page, with or without a (right) secret."""
        headers = {"X-Webhook-Secret": secret} if secret else {}
        response = page_of(status_fn, **headers)
        assert response.status_code == 200
        assert response.mimetype == "text/html"
        assert "<title>smart-resume console</title>" in response.get_data(as_text=True)
        assert response.headers["Vary"] == "Accept"
        assert response.headers["Cache-Control"] == "no-store"

    def test_the_page_is_served_even_when_misconfigured(self, status_fn, configure) -> None:
        """No secret configured: the page still loads (its JSON calls will say why not)."""
        configure(SMART_RESUME_WEBHOOK_SECRET=None)
        assert page_of(status_fn).status_code == 200
        assert status_fn.get("/", headers=SECRET).status_code == 500

    def test_the_page_holds_no_data(self, status_fn, db) -> None:
        """Stored names and runs never appear in the page itself."""
        seed_clients(db, 1, prefix="Zanzibar")
        db.document("runs/20261128-060000-ab12").set({"status": "completed"})
        page = page_of(status_fn).get_data(as_text=True)
        assert "Zanzibar" not in page
        assert "20261128-060000-ab12" not in page
        assert "test-secret" not in page

    @pytest.mark.parametrize(
        ("path", "accept"),
        [
            ("/", None),
            ("/", "*/*"),
            ("/", "application/json"),
            ("/", "application/json, text/html;q=0.5"),
            ("/?runs=3", BROWSER),
            ("/?clients=10", BROWSER),
            ("/?check=health", BROWSER),
        ],
    )
    def test_anything_else_gets_json(self, status_fn, path, accept) -> None:
        """curl, scripts and the page's own calls (and any ?runs, ?clients, ?check) get JSON."""
        headers = {"Accept": accept} if accept else {}
        response = status_fn.get(path, headers=headers)
        assert response.status_code == 401
        assert response.get_json() == {"error": "unauthorized"}

    def test_a_post_never_gets_the_page(self, status_fn) -> None:
        response = status_fn.post("/", headers={"Accept": BROWSER}, data="{}")
        assert response.status_code == 401

    def test_the_policy_allows_only_the_page_itself(self, status_fn) -> None:
        """CSP: nothing by default, its own inline script and style by hash, connections to
        its own origin only, no framing."""
        response = page_of(status_fn)
        policy = dict(
            part.strip().split(" ", 1)
            for part in response.headers["Content-Security-Policy"].split(";")
        )
        page = response.get_data(as_text=True)
        scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
        styles = re.findall(r"<style>(.*?)</style>", page, flags=re.DOTALL)
        assert len(scripts) == 1 and len(styles) == 1

        def digest(block: str) -> str:
            return (
                "'sha256-"
                + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
                + "'"
            )

        assert policy["default-src"] == "'none'"
        assert policy["script-src"] == digest(scripts[0])
        assert policy["style-src"] == digest(styles[0])
        assert policy["connect-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'"
        assert "unsafe" not in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"

    def test_the_page_is_self_contained(self, status_fn) -> None:
        """No external script, style, font or image: nothing that names another origin."""
        page = page_of(status_fn).get_data(as_text=True)
        assert not re.search(r"<script[^>]*\bsrc=", page)
        assert not re.search(r"<link[^>]*stylesheet", page)
        assert "@import" not in page and "url(" not in page and "@font-face" not in page
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
        assert not re.search(r"""\bstyle=["']""", page)  # inline attributes are refused by CSP
        assert "innerHTML" not in page and "eval(" not in page
        assert "localStorage" not in page  # the secret stays in the tab's session storage


class TestClientsParameter:
    @pytest.mark.parametrize(
        "query",
        ["clients=0", "clients=501", "clients=-1", "clients=abc", "clients=", "clients=1.5",
         "clients=1&clients=2", "clients=%C2%B2", "clients=5&after=a/b", "clients=5&after=",
         "clients=5&after=__x__", "clients=5&after=a&after=b"],
    )  # fmt: skip
    def test_out_of_range_is_400(self, status_fn, query) -> None:
        response = status_fn.get(f"/?{query}", headers=SECRET)
        assert response.status_code == 400
        body = response.get_json()
        assert body["error"] == "invalid request"
        assert "'clients'" in body["detail"] or "'after'" in body["detail"]

    def test_needs_the_secret(self, status_fn) -> None:
        assert status_fn.get("/?clients=5").status_code == 401
        assert status_fn.get("/?clients=5", headers={"X-Webhook-Secret": "x"}).status_code == 401

    @pytest.mark.parametrize("n", ["1", "500"])
    def test_bounds_are_accepted(self, status_fn, n) -> None:
        body = listing(status_fn, f"clients={n}")
        assert (body["clients"], body["next"]) == ([], None)


class TestClientsListing:
    @pytest.fixture(autouse=True)
    def pipeline(self, pipeline_file) -> None:
        pipeline_file(PIPELINE)

    def test_pages_by_client_id(self, status_fn, db) -> None:
        """Pages follow the client id; `next` is the last id of a page with more after it."""
        ids = seed_clients(db, 5)
        first = listing(status_fn, "clients=2")
        assert [c["clientId"] for c in first["clients"]] == ids[:2]
        assert first["next"] == ids[1]
        second = listing(status_fn, f"clients=2&after={first['next']}")
        assert [c["clientId"] for c in second["clients"]] == ids[2:4]
        third = listing(status_fn, f"clients=2&after={second['next']}")
        assert [c["clientId"] for c in third["clients"]] == ids[4:]
        assert third["next"] is None
        assert listing(status_fn, "clients=5")["next"] is None

    def test_fields_of_each_client_and_operation(self, status_fn, db) -> None:
        """The contract's fields, from the client and its operation states."""
        now = dt.datetime.now(dt.UTC)
        done = now - dt.timedelta(hours=1)
        db.document("clients/a").set({"name": "Acme", "active": True, "nextDueAt": now})
        state(db, "a", "first", status="success", finishedAt=done, failures=0)
        state(db, "a", "second", status="failed", finishedAt=done, failures=1)
        db.document("clients/b").set({"name": "Bolt", "active": False, "operations": ["second"]})
        body = listing(status_fn, "clients=10")
        assert body["operations"] == ["first", "second"]
        acme, bolt = body["clients"]
        assert {k: acme[k] for k in ("clientId", "name", "active")} == {
            "clientId": "a",
            "name": "Acme",
            "active": True,
        }
        assert acme["nextDueAt"].endswith("Z")
        first = acme["operations"]["first"]
        assert first["status"] == "success"
        assert first["finishedAt"] == done.isoformat().replace("+00:00", "Z")
        assert first["failures"] == 0
        assert first["state"] == "fresh"
        due = dt.datetime.fromisoformat(first["nextDueAt"])
        assert abs((due - (done + dt.timedelta(hours=24))).total_seconds()) < 1
        second = acme["operations"]["second"]
        assert (second["status"], second["failures"], second["state"]) == ("failed", 1, "retry")
        assert bolt["active"] is False
        assert bolt["nextDueAt"] is None
        assert list(bolt["operations"]) == ["second"]  # the client's own subset
        assert bolt["operations"]["second"] == {
            "status": None,
            "finishedAt": None,
            "failures": 0,
            "error": None,
            "nextDueAt": None,
            "state": "inactive",
            "reason": "the client is inactive: not run until it is active",
        }

    def test_backoff_quarantine_and_blocked(self, status_fn, db) -> None:
        """Failing work is labelled as the engine decides it; what it holds back is blocked."""
        now = dt.datetime.now(dt.UTC)
        seed_clients(db, 2)
        state(db, "c00000", "first", status="failed", finishedAt=now, failures=2)
        state(db, "c00001", "first", status="quarantined", finishedAt=now, failures=2)
        state(db, "c00001", "second", status="success", finishedAt=now - dt.timedelta(days=2))
        backing, quarantined = listing(status_fn, "clients=2")["clients"]
        first = backing["operations"]["first"]
        assert (first["state"], first["failures"]) == ("backoff", 2)
        due = dt.datetime.fromisoformat(first["nextDueAt"])
        assert abs((due - (now + dt.timedelta(seconds=600))).total_seconds()) < 1
        assert backing["operations"]["second"]["state"] == "blocked"
        assert quarantined["operations"]["first"]["state"] == "quarantined"
        assert quarantined["operations"]["first"]["nextDueAt"] is None  # until released
        assert quarantined["operations"]["second"]["state"] == "blocked"
        assert quarantined["operations"]["second"]["nextDueAt"] is None

    def test_failing_operations_carry_their_last_error(self, status_fn, db) -> None:
        """A failed (retrying or backing off) or quarantined operation returns its last error
        as `error`: one line, bounded, the webhook secret masked; others carry null."""
        now = dt.datetime.now(dt.UTC)
        seed_clients(db, 3)
        long = "HTTP 500 from https://svc/?key=test-secret-2-0123456\n" + "x" * 5000
        state(db, "c00000", "first", status="failed", finishedAt=now, failures=2, error=long)
        state(db, "c00001", "first", status="quarantined", finishedAt=now, failures=6,
              error="ValueError: bad lead")  # fmt: skip
        state(db, "c00002", "first", status="success", finishedAt=now, error="stale text")
        backing, quarantined, fine = listing(status_fn, "clients=3")["clients"]
        error = backing["operations"]["first"]["error"]
        assert error.startswith("HTTP 500 from https://svc/?key=*** xxx")
        assert "test-secret-2-0123456" not in error and "\n" not in error
        assert len(error) == console.MAX_ERROR_CHARS and error.endswith("…")
        assert quarantined["operations"]["first"]["error"] == "ValueError: bad lead"
        assert fine["operations"]["first"]["error"] is None
        assert backing["operations"]["second"]["error"] is None  # never ran

    def test_an_inactive_client_is_neither_new_nor_due(self, status_fn, db) -> None:
        """An inactive client's operations read `inactive` with no due time, whatever they
        last did; its failing operation still shows its error."""
        now = dt.datetime.now(dt.UTC)
        db.document("clients/z").set({"name": "Zed", "active": False})
        state(db, "z", "first", status="failed", finishedAt=now, failures=1, error="boom")
        (zed,) = listing(status_fn, "clients=5")["clients"]
        first, second = zed["operations"]["first"], zed["operations"]["second"]
        assert (first["state"], first["nextDueAt"], first["error"]) == ("inactive", None, "boom")
        assert (second["state"], second["nextDueAt"], second["status"]) == ("inactive", None, None)

    def test_hostile_names_are_data(self, status_fn, db) -> None:
        """A name is returned as it is stored (the page shows it as text, never as markup)."""
        db.document("clients/x").set({"name": "<img src=x onerror=alert(1)>", "active": True})
        assert listing(status_fn, "clients=1")["clients"][0]["name"] == (
            "<img src=x onerror=alert(1)>"
        )

    def test_only_this_stream(self, status_fn, db, configure) -> None:
        """With SMART_RESUME_STREAM set, only that stream's clients are listed."""
        configure(SMART_RESUME_STREAM="1")
        seed_clients(db, 2, prefix="one", stream=1)
        seed_clients(db, 2, prefix="two", stream=2)
        body = listing(status_fn, "clients=10")
        assert [c["clientId"] for c in body["clients"]] == ["one00000", "one00001"]

    def test_a_broken_pipeline_still_lists_the_clients(self, status_fn, db, pipeline_file):
        pipeline_file("not = [valid")
        seed_clients(db, 1)
        body = listing(status_fn, "clients=5")
        assert body["clients"][0]["operations"] == {}
        assert "not valid TOML" in body["pipelineError"]


class TestReadsLittle:
    def test_projections_only_and_one_batched_read(self, db, pipeline_file, monkeypatch) -> None:
        """Clients are read with a field mask and their states with one batched read of the
        decision fields: never a whole document, so never a checkpoint."""
        from google.cloud.firestore_v1.query import Query

        from shared.config import get_settings

        pipeline_file(PIPELINE)
        seed_clients(db, 3)
        state(db, "c00000", "first", status="partial", checkpoint={"big": "x" * 1000})
        projections: list[list[str]] = []
        real_stream = Query.stream

        def stream(self, *args, **kwargs):
            projections.append([f.field_path for f in self._projection.fields])
            return real_stream(self, *args, **kwargs)

        batched: list[tuple[int, list[str] | None]] = []

        class Spy:
            def collection(self, name):
                return db.collection(name)

            def get_all(self, refs, field_paths=None, **kwargs):
                refs = list(refs)
                batched.append((len(refs), field_paths))
                return db.get_all(refs, field_paths=field_paths, **kwargs)

        monkeypatch.setattr(Query, "stream", stream)
        body = console.list_clients(get_settings(), Spy(), 10)
        assert projections == [console.CLIENT_FIELDS]
        assert len(batched) == 1
        assert batched[0][0] == 6  # 3 clients x 2 operations
        assert "checkpoint" not in (batched[0][1] or ["checkpoint"])
        assert body["clients"][0]["operations"]["first"]["status"] == "partial"
