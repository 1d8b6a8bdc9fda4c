"""sites.yaml: a valid registry, and one clear line for each mistake."""

import base64

import pytest

from models.privacy.identity import generate_identity, public_bytes, save_identity
from models.sites.registry import RegistryError, parse_registry


@pytest.fixture
def keys(tmp_path):
    save_identity(generate_identity(), tmp_path, 0)  # client-0.key / .pub: the coordinator
    save_identity(generate_identity(), tmp_path, 1)
    return tmp_path, base64.b64encode(public_bytes(generate_identity())).decode()


def test_a_valid_registry_numbers_sites_in_order(keys):
    base, raw = keys
    registry = parse_registry(
        {
            "coordinator_key": "client-0.key",
            "sites": [
                {"name": "shop-a", "public_key": "client-1.pub", "deadline_seconds": 30},
                {"name": "shop-b", "public_key": raw},
            ],
        },
        base,
    )
    assert [(s.name, s.client_id) for s in registry.sites] == [("shop-a", 0), ("shop-b", 1)]
    assert registry.by_name("shop-a").deadline_seconds == 30.0
    short = {"name": "shop-c", "public_key": "client-1.pub", "deadline_seconds": 0.5}
    (site,) = parse_registry({"coordinator_key": "client-0.key", "sites": [short]}, base).sites
    assert site.deadline_seconds == 0.5  # any positive deadline, under a second too
    assert registry.by_name("shop-c") is None


@pytest.mark.parametrize(
    ("sites", "reason"),
    [
        ([{"name": "Shop A", "public_key": "client-1.pub"}], "name 'Shop A' must match"),
        ([{"name": "shop-a"}], "needs public_key"),
        ([{"name": "shop-a", "public_key": "nope.pub"}], r"nope\.pub: no such file, and"),
        ([{"name": "a", "public_key": "client-1.pub"}] * 2, "appears twice"),
        ([{"name": "a", "public_key": "client-1.pub", "speed": 2}], r"unknown keys \['speed'\]"),
        ([{"name": "a", "public_key": "client-1.pub", "deadline_seconds": 0}], "must be > 0"),
        ([{"name": "a", "public_key": "client-1.pub", "deadline_seconds": -5}], "must be > 0"),
        ([{"name": "a", "public_key": "client-1.pub", "deadline_seconds": True}], "must be > 0"),
        ([], "non-empty list"),
    ],
)
def test_each_mistake_is_one_line_naming_the_entry(keys, sites, reason):
    with pytest.raises(RegistryError, match=reason):
        parse_registry({"coordinator_key": "client-0.key", "sites": sites}, keys[0])


@pytest.mark.parametrize("lacking", ["coordinator_key", "sites"])
def test_a_registry_without_its_coordinator_key_or_sites_is_refused(keys, lacking):
    raw = {"coordinator_key": "client-0.key", "sites": [{"name": "a", "public_key": keys[1]}]}
    del raw[lacking]
    with pytest.raises(RegistryError, match=r"sites\.yaml: needs coordinator_key and sites"):
        parse_registry(raw, keys[0])


def test_a_sites_file_is_read_relative_to_its_folder(keys):
    from models.sites.registry import read_registry

    base, raw = keys
    (base / "sites.yaml").write_text(
        f"coordinator_key: client-0.key\nsites:\n  - {{name: shop-a, public_key: '{raw}'}}\n"
    )
    registry = read_registry(base / "sites.yaml")
    assert [(s.name, s.client_id) for s in registry.sites] == [("shop-a", 0)]
    with pytest.raises(RegistryError, match=r"absent\.yaml: no such sites file"):
        read_registry(base / "absent.yaml")


def test_sites_sharing_a_key_are_named_in_the_refusal(keys):
    base, raw = keys
    sites = [
        {"name": "shop-a", "public_key": "client-1.pub"},
        {"name": "shop-b", "public_key": raw},
        {"name": "shop-c", "public_key": raw},
    ]
    with pytest.raises(RegistryError, match="sites shop-b and shop-c share one public key"):
        parse_registry({"coordinator_key": "client-0.key", "sites": sites}, base)


def test_a_missing_coordinator_key_is_refused(keys):
    with pytest.raises(RegistryError, match="coordinator_key"):
        parse_registry({"coordinator_key": "none.key", "sites": [{"name": "a"}]}, keys[0])


def test_precision_and_compression_are_read_and_checked(keys):
    sites = [{"name": "a", "public_key": "client-1.pub"}]
    raw = {"coordinator_key": "client-0.key", "sites": sites, "precision": "float32"}
    registry = parse_registry(raw | {"compress": True}, keys[0])
    assert (registry.precision, registry.compress) == ("float32", True)
    with pytest.raises(RegistryError, match="compress 'yes'; allowed: true, false"):
        parse_registry(raw | {"compress": "yes"}, keys[0])
    with pytest.raises(RegistryError, match="precision 'float16'"):
        parse_registry(raw | {"precision": "float16"}, keys[0])


def test_a_site_pins_its_peers_from_a_sites_file_without_the_coordinators_key(keys):
    from models.sites.registry import read_peers

    base, raw = keys
    (base / "peers.yaml").write_text(
        "coordinator_key: not-handed-out.key\n"
        "sites:\n  - {name: shop-a, public_key: client-1.pub}\n"
        f"  - {{name: shop-b, public_key: '{raw}'}}\n"
    )
    (base / "broken.yaml").write_text("sites:\n  - {name: shop-a}\n")

    pinned = read_peers(base / "peers.yaml")

    own = (base / "client-1.pub").read_bytes()
    assert base64.b64decode(raw) in pinned and len(pinned) == 2 and own not in pinned  # raw keys
    with pytest.raises(RegistryError, match=r"broken.yaml: sites\[0\] has no public_key"):
        read_peers(base / "broken.yaml")
    with pytest.raises(RegistryError, match="no such peers file"):
        read_peers(base / "absent.yaml")
    for text in ("sites: []\n", "sites: shop-a\n", "peers: []\n"):  # no peer to pin
        (base / "empty.yaml").write_text(text)
        with pytest.raises(RegistryError, match="needs a non-empty list 'sites'"):
            read_peers(base / "empty.yaml")


def test_a_site_weight_is_a_positive_integer_for_plain_runs_only(keys):
    base, raw = keys

    def registry(weight):
        site = {"name": "shop-a", "public_key": raw} | (
            {} if weight is None else {"weight": weight}
        )
        return parse_registry({"coordinator_key": "client-0.key", "sites": [site]}, base)

    assert registry(None).sites[0].weight == 1 and registry(3).sites[0].weight == 3
    for bad in (0, 2.5, True, "2"):
        with pytest.raises(RegistryError, match=r"sites\[0\] \(shop-a\): weight .* positive"):
            registry(bad)
    registry(3).check_weights(private=False, secure=False)
    registry(1).check_weights(private=True, secure=True)
    for private, secure in ((True, False), (False, True)):
        with pytest.raises(RegistryError, match=r"weight on shop-a: .* without --dp-epsilon"):
            registry(3).check_weights(private=private, secure=secure)
    named = parse_registry(
        {"coordinator_key": "client-0.key", "sites": [{"name": "shop-a", "public_key": raw,
                                                       "weight": 2}]}, base, "weighted.yaml",
    )  # fmt: skip
    with pytest.raises(RegistryError, match=r"^weighted\.yaml: weight on shop-a"):
        named.check_weights(private=True, secure=False)  # the file it was read from


def test_a_published_catalogue_is_read_relative_to_the_sites_file(keys):
    base = keys[0]
    (base / "items.csv").write_text("item_id\n7\n3\n")
    raw = {
        "coordinator_key": "client-0.key",
        "sites": [{"name": "a", "public_key": "client-1.pub"}],
    }
    assert parse_registry(raw, base).catalogue is None
    assert parse_registry(raw | {"catalogue": "items.csv"}, base).catalogue.tolist() == [3, 7]
    (base / "items.csv").write_text("item_id\n7\nx7\n")  # product codes: a text catalogue
    assert parse_registry(raw | {"catalogue": "items.csv"}, base).catalogue.tolist() == ["7", "x7"]
    (base / "items.csv").write_text('item_id\n7\n""\n')
    with pytest.raises(
        RegistryError,
        match=r"sites.yaml: catalogue .*items.csv, row 2, column 'item_id': value '' is empty",
    ):
        parse_registry(raw | {"catalogue": "items.csv"}, base)


def test_a_public_key_given_as_the_coordinators_key_is_named_as_one(keys):
    """The advice was to chmod the .pub file (it is 0644), then cryptography's own words."""
    base, _ = keys
    with pytest.raises(
        RegistryError,
        match=r"coordinator_key .*client-1\.pub: .*client-1\.pub is a public key; an identity is "
        r"the private key `fedrec keygen` wrote beside it \(client-1\.key\)$",
    ):
        parse_registry({"coordinator_key": "client-1.pub", "sites": []}, base)
    garbage = base / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    with pytest.raises(
        RegistryError, match=r"garbage\.key is not an unencrypted private key in PEM"
    ):
        parse_registry({"coordinator_key": "garbage.key", "sites": []}, base)
