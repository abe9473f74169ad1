"""Which of our Kibana saved objects to import: only those missing, or older than ours and never edited.

Importing with overwrite on every start reverted whatever a user had changed in the dashboard. Instead,
setup keeps a record, in Elasticsearch (index ``smartgas-setup``, document ``kibana-saved-objects``), of
each object it imported: the digest of our asset and the ``updated_at`` Kibana gave the object then.
On the next run, for each of our objects:

- missing in Kibana: imported;
- in Kibana with the ``updated_at`` of our import (nobody changed it since) and our asset changed: imported
  over it, since it is an older version of ours;
- in Kibana with the same digest: left alone, it is current;
- in Kibana and changed since our import (another ``updated_at``), or never imported by us: kept, and the
  log says so — a user's edit is never reverted. Delete the object in Kibana to get ours again.

The planning is pure (:func:`plan_import`); provision.py does the I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

RECORD_INDEX = "smartgas-setup"
RECORD_ID = "kibana-saved-objects"


def object_key(saved_object: Mapping[str, Any]) -> str:
    """``type/id``: how Kibana tells saved objects apart within a space."""
    return f"{saved_object['type']}/{saved_object['id']}"


def asset_digest(saved_object: Mapping[str, Any]) -> str:
    """A digest of one of our objects as shipped: it changes when we change the asset."""
    canonical = json.dumps(saved_object, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Imported:
    """What the record holds for one object: our asset's digest and Kibana's ``updated_at`` after import."""

    digest: str
    updated_at: str | None


@dataclass(slots=True)
class ImportPlan:
    """Our objects sorted by what to do with them."""

    to_import: list[dict[str, Any]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # key → why imported
    current: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # changed in Kibana since our import: left as they are


def plan_import(
    ours: list[dict[str, Any]],
    in_kibana: Mapping[str, str | None],
    record: Mapping[str, Imported],
) -> ImportPlan:
    """Decide per object. ``in_kibana`` maps the keys Kibana has to their ``updated_at``."""
    plan = ImportPlan()
    for saved_object in ours:
        key = object_key(saved_object)
        previous = record.get(key)
        if key not in in_kibana:
            plan.to_import.append(saved_object)
            plan.reasons[key] = "missing in Kibana"
        elif previous is None or previous.updated_at != in_kibana[key]:
            plan.kept.append(key)
        elif previous.digest == asset_digest(saved_object):
            plan.current.append(key)
        else:
            plan.to_import.append(saved_object)
            plan.reasons[key] = "older than ours, never edited"
    return plan


def read_record(document: Mapping[str, Any] | None) -> dict[str, Imported]:
    """The record from its Elasticsearch ``_source`` (None: nothing imported yet)."""
    entries = (document or {}).get("objects") or []
    return {
        str(entry["key"]): Imported(str(entry.get("digest", "")), entry.get("updated_at"))
        for entry in entries
        if isinstance(entry, dict) and "key" in entry
    }


def record_document(record: Mapping[str, Imported]) -> dict[str, Any]:
    """The record as an Elasticsearch document (a list, so that object keys never become field names)."""
    return {
        "objects": [
            {"key": key, "digest": entry.digest, "updated_at": entry.updated_at}
            for key, entry in sorted(record.items())
        ]
    }
