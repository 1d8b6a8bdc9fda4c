"""The cached description of `fedrec train`'s flags: keyed on every source that shapes the
config's fields, the core's included, and rebuilt whenever the key does not match."""

from __future__ import annotations

import json
from pathlib import Path

import fedrec.config_flags as flags

REPO = Path(__file__).resolve().parents[2]


def test_the_cache_key_covers_the_config_and_every_core_module():
    sources = set(flags._sources())
    assert REPO / "fedrec" / "config.py" in sources
    core = set((REPO / "models").rglob("*.py"))
    assert core and core <= sources  # the fields' types and defaults come from the core too


def test_a_cache_of_other_sources_is_rebuilt_and_one_of_these_is_read(tmp_path, monkeypatch):
    cache = tmp_path / "train_flags.json"
    monkeypatch.setattr(flags, "_CACHE", cache)
    bogus = [{"name": "only", "kind": "int", "choices": None, "help": "h", "default": 1,
              "default_text": "1"}]  # fmt: skip
    cache.write_text(json.dumps({"key": "stale", "fields": bogus}))

    fields = flags.config_fields()  # another key: described afresh, and written for next time

    assert [f["name"] for f in fields] == [f["name"] for f in flags.describe_fields()]
    assert json.loads(cache.read_text()) == {"key": flags._key(), "fields": fields}
    cache.write_text(json.dumps({"key": flags._key(), "fields": bogus}))
    assert flags.config_fields() == bogus  # this key: read, not described again
