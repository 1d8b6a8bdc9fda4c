"""Which earlier version a run on the same data and config would only repeat, read from a real
SQLite MLflow registry whose versions carry the tags a training run writes."""

from __future__ import annotations

import pytest

from tests.flows.helpers import tracking_store

FINGERPRINT, CONFIG = "data-1", "config-1"


@pytest.fixture
def registry(tmp_path):
    """A model ``m`` and a way to add versions with a training run's tags (``promoted="true"``
    is the tag ``fedrec.promoted``)."""
    with tracking_store(tmp_path) as store:
        client = store["client"]
        client.create_registered_model("m")
        experiment = client.create_experiment("fedrec")

        def add(fingerprint: str = FINGERPRINT, config: str = CONFIG, **tags: str) -> str:
            run = client.create_run(experiment)
            version = client.create_model_version(
                "m",
                f"runs:/{run.info.run_id}/model",
                run_id=run.info.run_id,
                tags={
                    "fedrec.dataset_fingerprint": fingerprint,
                    "fedrec.config_hash": config,
                    "fedrec.metrics_json": '{"valid/rmse": 0.9}',
                    **{f"fedrec.{name}": value for name, value in tags.items()},
                },
            )
            return str(version.version)

        def champion(version: str) -> None:
            client.set_registered_model_alias("m", "champion", version)

        yield store["uri"], add, champion


def _repeat(uri: str):
    from tasks.tracking import repeated_version

    return repeated_version.fn(uri, "m", FINGERPRINT, CONFIG)


def test_the_champion_itself_is_repeated(registry):
    uri, add, champion = registry
    champion(add(promoted="true"))

    repeat = _repeat(uri)

    assert (repeat.version, repeat.champion, repeat.why) == ("1", "1", "champion")
    assert repeat.metrics == {"valid/rmse": 0.9}


def test_a_champion_whose_metrics_tag_was_cut_mid_value_is_still_repeated(registry):
    uri, add, champion = registry
    champion(add(promoted="true", metrics_json='{"valid/rmse": 0.9, "valid/ma'))

    repeat = _repeat(uri)

    assert (repeat.version, repeat.why, repeat.metrics) == ("1", "champion", {})


def test_a_version_that_lost_to_the_current_champion_is_repeated(registry):
    uri, add, champion = registry
    champion(add("other-data", promoted="true"))
    add(promoted="false", compared_with_version="1")

    repeat = _repeat(uri)

    assert (repeat.version, repeat.champion, repeat.why) == ("2", "1", "lost")


def test_a_version_rolled_back_by_an_operator_is_repeated_even_without_a_champion(registry):
    uri, add, _ = registry
    add(promoted="true", rolled_back="by ops")

    repeat = _repeat(uri)

    assert (repeat.version, repeat.champion, repeat.why) == ("1", None, "rolled back")


@pytest.mark.parametrize(
    "tags",
    [
        # it was the champion once, and another has replaced it since: it may win again
        {"promoted": "true"},
        # it lost to a former champion, not to the current one
        {"promoted": "false", "compared_with_version": "1"},
    ],
    ids=["a-former-champion", "lost-to-a-former-champion"],
)
def test_a_version_the_current_champion_never_beat_is_trained_again(registry, tags):
    uri, add, champion = registry
    add("older-data", promoted="true")  # version 1, champion first
    add(**tags)  # version 2, same data and config as the run asks
    champion(add("newer-data", promoted="true"))  # version 3, the champion now

    assert _repeat(uri) is None


def test_without_a_champion_a_version_that_lost_is_trained_again(registry):
    uri, add, _ = registry
    add(promoted="false", compared_with_version="7")

    assert _repeat(uri) is None


def test_other_data_or_another_config_is_never_a_repeat(registry):
    uri, add, champion = registry
    champion(add("other-data", promoted="true"))
    add(config="other-config", promoted="false", compared_with_version="1")
    add("newer-data", rolled_back="by ops")

    assert _repeat(uri) is None
