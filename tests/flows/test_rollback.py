"""An operator's roll-back: the champion alias moves back, both versions say who moved it and
why, and the nightly run does not promote the demoted model again on the same data and config
(while a run on another config is still compared, with the restored champion)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from fedrec.config import TrainingConfig
from tests.flows.helpers import tracking_store

SMALL = {"synthetic_users": 300, "synthetic_items": 150, "synthetic_interactions": 9_000,
         "clients": 2, "factors": 4, "model_name": "shop"}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-rollback")) as store:
        yield store


def _train(store, **fields) -> dict:
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | fields))
    return federated_training(**config.model_dump())


def _cli(store, *args: str):
    from fedrec.cli import main

    return CliRunner().invoke(main, [*args, "--tracking-uri", store["uri"]])


def _column(listed: str) -> dict[str, str]:
    """`fedrec models`' promoted column by version (its version rows start at column 2)."""
    return {line.split()[0]: line.split()[5] for line in listed.splitlines()[2:] if line[2] != " "}


def _champion(store) -> str:
    return str(store["client"].get_model_version_by_alias("shop", "champion").version)


@pytest.fixture
def shop_store(tmp_path, prefect_server):
    """A store of this test's own: its roll-back without --model-name finds one model there,
    whichever of the module's tests ran before it."""
    with tracking_store(tmp_path) as store:
        yield store


def test_a_rolled_back_model_stays_demoted_and_new_configs_meet_the_restored_champion(shop_store):
    store = shop_store
    client = store["client"]
    first = _train(store, rounds=1)
    second = _train(store, rounds=6)
    assert (first["model_version"], second["model_version"]) == ("1", "2")
    assert second["promoted"], second["reason"]  # the precondition: version 2 replaced 1
    assert _column(_cli(store, "models", "--model-name", "shop").stdout) == {
        "2*": "true",
        "1": "replaced",
    }

    done = _cli(store, "rollback", "--reason", "recommends out-of-stock items")

    assert done.exit_code == 0, done.output
    assert "shop: champion is version 1 again, in place of version 2" in done.stdout
    assert _champion(store) == "1"
    demoted, restored = client.get_model_version("shop", "2"), client.get_model_version("shop", "1")
    assert demoted.tags["fedrec.rolled_back"].endswith(
        "champion moved back to version 1: recommends out-of-stock items"
    )
    assert "in place of version 2: recommends out-of-stock" in restored.tags["fedrec.restored"]
    assert "fedrec.replaced_by_version" not in restored.tags  # no longer true
    shown = _cli(store, "models", "--model-name", "shop").stdout
    assert "rolled back: " in shown and "restored: " in shown
    assert _column(shown) == {"2": "demoted", "1*": "true"}

    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | {"rounds": 6}))
    # the nightly run on the demoted version's data and config
    state = federated_training(**config.model_dump(), return_state=True)
    again = state.result()
    said = "version 2 was trained on these data with this config and rolled back by hand"
    assert again.get("skipped") and said in again["reason"] and again["same_as_version"] == "2"
    assert state.is_completed() and state.message.startswith(said)  # what an API poller reads
    assert again["champion_version"] == "1"
    assert len(client.search_model_versions("name='shop'")) == 2 and _champion(store) == "1"

    state = federated_training(**config.model_copy(update={"rounds": 3}).model_dump(),
                               return_state=True)  # fmt: skip
    other = state.result()  # another config: trained and compared with version 1
    assert other["model_version"] == "3"
    verdict = "promoted to champion" if other["promoted"] else "not promoted"
    assert state.message == f"model shop version 3: {verdict} ({other['reason']})"
    compared = client.get_model_version("shop", "3").tags["fedrec.compared_with_version"]
    assert compared == "1"


def test_a_rollback_that_cannot_be_made_is_one_line_and_changes_nothing(store):
    from tasks.tracking import roll_back

    _train(store, rounds=1, model_name="solo")
    _train(store, rounds=1, model_name="duo")  # a second model, whichever test ran first
    nothing_before = _cli(store, "rollback", "--model-name", "solo")
    assert nothing_before.exit_code == 2
    assert "champion version 1 replaced no earlier champion; give --to VERSION" in (
        nothing_before.stderr
    )
    unknown = _cli(store, "rollback", "--model-name", "solo", "--to", "7")
    assert unknown.exit_code == 2
    assert "--to 7: solo has no such version; allowed: none" in unknown.stderr  # champion only
    same = _cli(store, "rollback", "--model-name", "solo", "--to", "1")
    assert same.exit_code == 2 and "version 1 is the champion already" in same.stderr
    several = _cli(store, "rollback")
    assert several.exit_code == 2 and "--model-name is needed" in several.stderr
    with pytest.raises(ValueError, match="no champion to roll back"):
        roll_back(store["uri"], "nobody")
    solo = store["client"].get_model_version("solo", "1")
    assert "fedrec.rolled_back" not in solo.tags and "fedrec.restored" not in solo.tags

    # a version that never was champion is made champion "now"; then back "again"
    kept = _train(store, rounds=2, model_name="solo", min_delta=1e9)
    assert not kept["promoted"] and kept["model_version"] == "2"
    unknown = _cli(store, "rollback", "--model-name", "solo", "--to", "9")
    assert "--to 9: solo has no such version; allowed: 2" in unknown.stderr  # not the champion
    chosen = _cli(store, "rollback", "--model-name", "solo", "--to", "2")
    assert "solo: champion is version 2 now, in place of version 1" in chosen.stdout
    assert chosen.stderr.strip() == (
        f"note: version 2 was never champion before; its run did not promote it: {kept['reason']}"
    )
    back = _cli(store, "rollback", "--model-name", "solo")  # to the one it was compared with
    assert "solo: champion is version 1 again, in place of version 2" in back.stdout
    assert "note:" not in back.stderr
    # version 2 has been champion (by hand), though its run did not promote it
    again = _cli(store, "rollback", "--model-name", "solo", "--to", "2", "--reason", "test")
    assert "solo: champion is version 2 again, in place of version 1" in again.stdout
    assert "note:" not in again.stderr
    # the registry's descriptions say what the roll-backs did after what the runs decided
    client = store["client"]
    two, one = client.get_model_version("solo", "2"), client.get_model_version("solo", "1")
    assert two.description.startswith("als (explicit feedback), 2 rounds; data: ")
    assert re.search(r"; by hand, \d{4}-\d\d-\d\d \d\d:\d\d UTC: champion in place of "
                     r"version 1: test\.$", two.description), two.description  # fmt: skip
    assert re.search(r"; by hand, [^;]+: rolled back, champion moved to version 2: test\.$",
                     one.description), one.description  # fmt: skip
    assert one.description.count("; by hand, ") == 1  # the latest roll-back only
