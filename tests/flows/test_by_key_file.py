"""A by-key partition of the caller's own file: the clients are the values of one of its columns
(a shop's regions), each value's users on one client, read by the flow's own data tasks."""

from __future__ import annotations

import numpy as np

from fedrec.config import TrainingConfig


def test_a_csv_column_that_describes_the_user_partitions_the_clients(tmp_path):
    from tasks.data import load_interactions, plan_clients

    regions = ["north", "south", "NA", "east", "west"]
    rows = [
        f"u{u},i{(u * 7 + j) % 40},{1 + (u + j) % 5},{regions[u % 5]}"
        for u in range(60)
        for j in range(8)
    ]
    path = tmp_path / "shop.csv"
    path.write_text("user_id,item_id,rating,region\n" + "\n".join(rows) + "\n")
    region_of = {f"u{u}": regions[u % 5] for u in range(60)}

    for clients, expected in ((None, 5), (3, 3)):
        config = TrainingConfig(
            data=str(path), partition="by-key", partition_key="region", clients=clients,
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        )  # fmt: skip
        data, split = load_interactions.fn(config)
        planned = plan_clients(data, split, config)

        assert len(planned) == expected
        held = [{region_of[str(u)] for u in client.user_ids} for client in planned]
        assert sorted(v for values in held for v in values) == sorted(regions)  # each on one
        assert sum(len(client.user_ids) for client in planned) == 60
        if clients is None:
            assert all(len(values) == 1 for values in held)
        sizes = np.array([len(client.user_ids) for client in planned])
        assert sizes.min() > 0


def test_a_run_trains_one_client_per_value_of_the_files_column(tmp_path, prefect_server):
    from flows.training import federated_training
    from models.data.partitions import read_manifest, read_partition
    from models.data.synthetic import generate_synthetic

    data = generate_synthetic(n_users=200, n_items=60, n_interactions=6_000)
    frame = data.frame
    rows = [f"u{data.user_ids[u]},i{data.item_ids[i]},{r:g},r{data.user_ids[u] % 4}"
            for u, i, r in zip(frame["user"], frame["item"], frame["rating"], strict=True)]  # fmt: skip
    path = tmp_path / "shop.csv"
    path.write_text("user_id,item_id,rating,region\n" + "\n".join(rows) + "\n")
    config = TrainingConfig(
        data=str(path), partition="by-key", partition_key="region", clients=None, rounds=1,
        factors=2, keep_workspace=True, model_name="by-region",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip

    summary = federated_training(**config.model_dump())

    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=config.tracking_uri).get_run(summary["run_id"])
    assert run.info.run_name == "als-k2-by-region-1r"
    manifest = read_manifest(summary["workspace"])
    assert manifest.n_clients == 4 and summary["model_version"] == "1"
    assert summary["promoted"], summary["reason"]
    for entry in manifest.clients:
        users = read_partition(summary["workspace"], entry, manifest.n_items).user_ids
        assert len({int(str(u)[1:]) % 4 for u in users}) == 1, entry
    # the same file again is unchanged; the same rows with users moved to other regions are not
    again = federated_training(**config.model_dump())
    assert again["skipped"] is True, again
    moved = tmp_path / "moved.csv"
    moved.write_text(path.read_text().replace(",r0\n", ",rX\n").replace(",r1\n", ",r0\n")
                     .replace(",rX\n", ",r1\n"))  # fmt: skip
    retrained = federated_training(**config.model_copy(update={"data": str(moved)}).model_dump())
    assert "skipped" not in retrained and retrained["model_version"] == "2"
