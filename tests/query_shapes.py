"""Every query the code issues, recorded by shape, and Firestore's index rules to check each
against `firestore.indexes.json` (the emulator never refuses a query; production does).

A shape is the collection, the equality fields, the inequality fields and the order. The rules
(Firestore's documentation, "Index types"): equality filters alone, with or without an order on
the document id, are served by merging single-field indexes; a range filter or an order on one
field, with no equality filter, by that field's single-field index; anything else needs a
composite index whose fields are the equality fields (in any order) followed by the range or
order field in its direction.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.cloud.firestore_v1 import base_query

EQUALITY = {"EQUAL", "IN", "ARRAY_CONTAINS", "ARRAY_CONTAINS_ANY"}
NAME = "__name__"


@dataclass(frozen=True)
class Shape:
    collection: str
    group: bool
    equality: frozenset[str]
    inequality: frozenset[str]
    order: tuple[tuple[str, str], ...]

    def needs(self) -> tuple[frozenset[str], str, str] | None:
        """The composite index this shape needs (equality fields, then one field and its
        direction), or None when single-field indexes serve it."""
        # An ascending order on the document id comes with every index; a descending one
        # counts as an order field.
        ordered = [(f, d) for f, d in self.order if not (f == NAME and d == "ASCENDING")]
        ranged = set(self.inequality) | {f for f, _ in ordered}
        if not ranged:
            return None
        if len(ranged) > 1:
            raise ValueError(f"{self}: more than one range or order field")
        field = ranged.pop()
        direction = next((d for f, d in ordered if f == field), "ASCENDING")
        if not self.equality:
            return None
        return self.equality, field, direction


_shapes: set[Shape] = set()
_mutex = threading.Lock()


def _fields(filter_pb: Any, equality: set[str], inequality: set[str]) -> None:
    if "composite_filter" in filter_pb:
        for sub in filter_pb.composite_filter.filters:
            _fields(sub, equality, inequality)
    elif "field_filter" in filter_pb:
        f = filter_pb.field_filter
        op = f.op.name
        (equality if op in EQUALITY else inequality).add(f.field.field_path)
    elif "unary_filter" in filter_pb:
        equality.add(filter_pb.unary_filter.field.field_path)


def _from_shared() -> bool:
    """Whether the query is built by the project's own code (tests query as they like)."""
    frame = sys._getframe(2)
    while frame is not None:
        if f"{os.sep}shared{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def record(query: Any, pb: Any) -> None:
    if not _from_shared():
        return
    equality: set[str] = set()
    inequality: set[str] = set()
    if "where" in pb:
        _fields(pb.where, equality, inequality)
    order = tuple((o.field.field_path, o.direction.name) for o in pb.order_by)
    if not (equality or inequality or order):
        return
    shape = Shape(
        pb.from_[0].collection_id,
        bool(pb.from_[0].all_descendants),
        frozenset(equality),
        frozenset(inequality),
        order,
    )
    with _mutex:
        _shapes.add(shape)


def install() -> None:
    """Record the shape of every query built from now on (kept for the whole session)."""
    if getattr(base_query.BaseQuery, "_shapes_installed", False):
        return
    real = base_query.BaseQuery._to_protobuf

    def to_protobuf(self: Any) -> Any:
        pb = real(self)
        record(self, pb)
        return pb

    base_query.BaseQuery._to_protobuf = to_protobuf  # type: ignore[method-assign]
    base_query.BaseQuery._shapes_installed = True  # type: ignore[attr-defined]


def shapes() -> set[Shape]:
    with _mutex:
        return set(_shapes)


def declared(path: Path) -> set[tuple[str, frozenset[str], str, str]]:
    """The composite indexes of the file: (collection, equality prefix, field, direction) for
    every split of an index into equality fields and its last field."""
    out = set()
    for index in json.loads(path.read_text())["indexes"]:
        fields = [(f["fieldPath"], f.get("order", "ASCENDING")) for f in index["fields"]]
        *head, (last, direction) = fields
        out.add((index["collectionGroup"], frozenset(f for f, _ in head), last, direction))
    return out
