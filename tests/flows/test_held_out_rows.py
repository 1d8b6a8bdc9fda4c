"""A version records which rows its run held out; a champion that held out other rows may have
trained on the candidate's held-out rows, which favours it: the run says so, and so does the
reason of a candidate that lost."""

from __future__ import annotations

from mlflow import MlflowClient

from fedrec.config import TrainingConfig

SMALL = {"synthetic_users": 300, "synthetic_items": 150, "synthetic_interactions": 9_000,
         "clients": 2, "factors": 2, "rounds": 2, "model_name": "rows"}  # fmt: skip


def test_a_champion_that_held_out_other_rows_is_named_in_a_lost_comparison(
    tmp_path, prefect_server
):
    from flows.training import federated_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = federated_training(**TrainingConfig(tracking_uri=uri, **SMALL).model_dump())
    # a quarter held out for validation: some of the champion's training rows are validation
    # rows now; one round of ALS does not beat it
    other = SMALL | {"valid_fraction": 0.25, "rounds": 1}
    second = federated_training(**TrainingConfig(tracking_uri=uri, **other).model_dump())

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = [client.get_model_version("rows", v["model_version"]).tags for v in (first, second)]
    assert tags[0]["fedrec.held_out"] == "random split, validation 0.1, test 0.1"
    assert tags[1]["fedrec.held_out"] == "random split, validation 0.25, test 0.1"
    assert first["promoted"] and not second["promoted"]
    assert not second["reason"].startswith("worse than the trivial baseline"), second["reason"]
    assert second["reason"].endswith(
        " (the champion held out other rows: random split, validation 0.1, test 0.1; it may "
        "have trained on some of this run's)"
    ), second["reason"]
    assert tags[1]["fedrec.promotion_reason"] == second["reason"]
    # the same rows held out: nothing to say
    third = federated_training(
        **TrainingConfig(tracking_uri=uri, **(SMALL | {"rounds": 1})).model_dump()
    )
    assert not third["promoted"] and "(the champion" not in third["reason"], third["reason"]
    assert not third["reason"].startswith("worse than the trivial baseline"), third["reason"]
    # nor on a refusal against the trivial baseline, which is not the champion's doing
    fourth = federated_training(**TrainingConfig(tracking_uri=uri, **(
        other | {"reg": 1000.0, "seed": 1})).model_dump())  # fmt: skip
    assert fourth["reason"].startswith("worse than the trivial baseline"), fourth["reason"]
    assert "held out other rows" not in fourth["reason"]
    # nor on a candidate that beats such a champion all the same (a weak one: one factor, one
    # round): it is promoted
    weak = federated_training(**TrainingConfig(tracking_uri=uri, **(
        SMALL | {"model_name": "rows-weak", "factors": 1, "rounds": 1})).model_dump())  # fmt: skip
    strong = other | {"model_name": "rows-weak", "factors": 8, "rounds": 6}
    fifth = federated_training(**TrainingConfig(tracking_uri=uri, **strong).model_dump())
    assert weak["promoted"] and fifth["promoted"], (weak["reason"], fifth["reason"])
    assert "held out other rows" not in fifth["reason"]
    champion = client.get_model_version_by_alias("rows-weak", "champion")
    assert str(champion.version) == str(fifth["model_version"])
