"""Every query the code issued in this test session has its index in `firestore.indexes.json`
(the emulator never refuses a query without one; production does). Runs last (file name), so
it sees the shapes of the whole suite; it also issues every query shape itself, with a stream
and shards set, so it checks them even when run alone."""

from __future__ import annotations

import query_shapes
from conftest import ROOT, run_once, seed_clients

from shared import quarantine, status

PIPE = '[[operation]]\nname = "first"\nkind = "python"\ntarget = "opfuncs:ok"\n'


def test_every_query_shape_has_its_index(db, configure, pipeline_file):
    pipeline_file(PIPE)
    for env in ({}, {"SMART_RESUME_STREAM": "1"}, {"SMART_RESUME_SHARDS": "2"}):
        settings = configure(**{"SMART_RESUME_STREAM": None, "SMART_RESUME_SHARDS": None, **env})
        seed_clients(db, 3, stream=1)
        options = {"shard": 0} if "SMART_RESUME_SHARDS" in env else {}
        run_once(settings, db, **options)
        status.snapshot(settings, db, runs=5)
        quarantine.failing(settings, db, settings.stream, (0, 2))
    declared = query_shapes.declared(ROOT / "firestore.indexes.json")
    shapes = query_shapes.shapes()
    assert len(shapes) >= 8, shapes  # the recorder saw the code's queries
    missing = []
    for shape in sorted(shapes, key=repr):
        need = shape.needs()
        if need is None:
            continue
        equality, field, direction = need
        if (shape.collection, equality, field, direction) not in declared:
            missing.append(
                f"{shape.collection}: {', '.join(sorted(equality))} then {field} {direction}"
            )
    assert not missing, "queries without an index in firestore.indexes.json:\n" + "\n".join(missing)
    print(f"FIGURE indexes: query shapes={len(shapes)}, composite indexes={len(declared)}")
