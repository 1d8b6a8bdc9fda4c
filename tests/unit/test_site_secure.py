"""Secure aggregation across site processes, in memory: three sites answer each SecAgg+ step
as a signed exchange, the coordinator runs the server half of the protocol and learns only the
sum, which equals the plain sum of the sites' updates; a substituted round key is refused by
the site, a site gone after masking is recovered from the others' shares, and a private site
counts the full noise only for an update it holds and masks among peers whose keys it pins."""

import base64
import json
import logging
import re
import threading
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from fedrec.sites.coordinator import AnswerCollector, Coordinator, SiteRefused
from fedrec.sites.process import Site, SiteOptions
from fedrec.sites.secure import FRACTION_BITS
from models.data.schema import encode_interactions
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig
from models.privacy.dp import UserLevelDP
from models.privacy.fixed_point import decode, encode
from models.privacy.identity import generate_identity, public_bytes, save_identity
from models.privacy.secagg_plus import (
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RoundConfig,
    SurvivorSignature,
    UnmaskShares,
    new_x25519,
)
from models.privacy.secagg_plus_server import SecAggServer
from models.sites.registry import Registry, SiteSpec
from models.sites.schema import check_answer_arrays
from models.sites.spec import family_spec, training_binding
from tests.sites_fakes import MemoryTransport

ALS = ExplicitMF(MFConfig(n_factors=3, clip_to=(1.0, 5.0)))
SPLIT = {"method": "random", "valid_fraction": 0.2, "test_fraction": 0.2}
ITEMS = np.arange(100, 112)
NAMES = ("shop-a", "shop-b", "shop-c")


@pytest.fixture
def world(tmp_path):
    transport, coordinator_key = MemoryTransport(), generate_identity()
    keys, sites, specs, stops = {}, {}, [], []
    for index, name in enumerate(NAMES):
        keys[name] = generate_identity()
        save_identity(keys[name], tmp_path / name, index)
        rng = np.random.default_rng(index)
        frame = pd.DataFrame(
            {
                "user": np.repeat(np.arange(6), 5) + 10 * index,
                "item": np.concatenate([rng.choice(ITEMS, 5, replace=False) for _ in range(6)]),
                "rating": rng.integers(1, 6, 30).astype(float),
            }
        )
        data = encode_interactions(frame, rating_scale=(1.0, 5.0), source=f"{name}.csv")
        options = SiteOptions(
            name=name,
            data="",
            prefect_api="http://unused/api",
            mlflow="http://unused",
            identity=tmp_path / name / f"client-{index}.key",
            coordinator_key=base64.b64encode(public_bytes(coordinator_key)).decode(),
            state_dir=tmp_path / f"state-{name}",
            events=False,
            allow_exact=True,  # the plain sums are the oracle of the secure ones
        )
        site = Site(options, data=data)
        site.transport.close()
        site.transport = transport
        sites[name] = site
        specs.append(SiteSpec(name, index, keys[name].public_key(), deadline_seconds=10.0))
        stops.append(_running(site))

    def coordinator(run: str) -> Coordinator:
        made = Coordinator(Registry(coordinator_key, tuple(specs)), transport, run, 0, SPLIT)
        made.publish_catalogue(ITEMS)
        made._collector = AnswerCollector(transport, poll_seconds=0.02)  # fast in memory
        return made

    yield coordinator, specs, sites, tmp_path
    for stop in stops:
        stop.set()


def _running(site: Site) -> threading.Event:
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            site.poll_once()
            stop.wait(0.02)

    threading.Thread(target=loop, daemon=True).start()
    return stop


def _train(coordinator, spec, *, secure, family=ALS, round_=1):
    arrays, _ = coordinator.exchange(
        spec,
        kind="train",
        phase="train",
        round_=round_,
        family=family,
        state=family.initial_state(len(ITEMS), seed=0),
        secure=coordinator.secure_fields() if secure else None,
        task_run_id=f"train-{spec.name}-{secure}-{round_}",
    )
    return check_answer_arrays(arrays, client_id=spec.client_id, n_items=len(ITEMS))[0]


def _plain_dense(coordinator, specs) -> dict[int, np.ndarray]:
    """Each site's update asked in the clear (an oracle independent of the protocol)."""
    return {
        s.client_id: ALS.to_dense(_train(coordinator, s, secure=False), len(ITEMS)) for s in specs
    }


class _Round:
    """The coordinator's half of one round: the server steps, each site step an exchange;
    everything the coordinator received is kept to be inspected."""

    def __init__(self, coordinator, specs, size, run, round_=1, family=ALS):
        self.coordinator, self.specs = coordinator, {s.client_id: s for s in specs}
        binding = training_binding(family_spec(family), "train")
        self.config = RoundConfig(run, round_, len(specs), size, 2, FRACTION_BITS, binding=binding)
        self.server = SecAggServer(self.config, {s.client_id: s.public_key for s in specs})
        self.received: list[bytes] = []

    def ask(self, step, messages):
        out = {}
        for c, message in sorted(messages.items()):
            reply = self.coordinator.secure_step(
                self.specs[c],
                step,
                self.config,
                message,
                task_run_id=f"{step}-{c}-r{self.config.round}",
            )
            self.received.append(reply)
            out[c] = reply
        return out

    def run(self, masking=None, after_mask=None):
        return self.finish(self.advertise(), masking, after_mask)

    def advertise(self):
        adverts = self.ask("advertise", dict.fromkeys(sorted(self.specs)))
        return self.server.key_directory([KeyAdvertisement.from_bytes(b) for b in adverts.values()])

    def finish(self, directory, masking=None, after_mask=None):
        """The steps after the key directory; the sum and each site's masked vector."""
        everyone = sorted(self.specs)
        shares = self.ask("share", dict.fromkeys(everyone, directory.to_bytes()))
        inboxes = self.server.route_shares([EncryptedShares.from_bytes(b) for b in shares.values()])
        masking = everyone if masking is None else masking
        masked = self.ask("mask", {c: inboxes[c].to_bytes() for c in masking})
        survivors = self.server.commit([MaskedInput.from_bytes(b) for b in masked.values()])
        alive = survivors.survivors if after_mask is None else after_mask
        signed = self.ask("sign", dict.fromkeys(alive, survivors.to_bytes()))
        request = self.server.unmask_request(
            [SurvivorSignature.from_bytes(b) for b in signed.values()]
        )
        answers = self.ask("unmask", dict.fromkeys(sorted(request.signatures), request.to_bytes()))
        total = self.server.aggregate_decoded(
            [UnmaskShares.from_bytes(b) for b in answers.values()]
        )
        return total, {c: MaskedInput.from_bytes(b).vector for c, b in masked.items()}


def _trained_round(coordinator, specs, run) -> _Round:
    """A secure round of a new run ``run`` whose sites hold their trained updates."""
    secure = coordinator(run)
    receipts = [_train(secure, s, secure=True) for s in specs]
    return _Round(secure, specs, int(receipts[0].metrics["held"]), secure.run)


def _secure_round(coordinator, specs, round_=1, **drops):
    receipts = [_train(coordinator, s, secure=True, round_=round_) for s in specs]
    assert all(r.items.size == 0 and not r.arrays for r in receipts)  # nothing but a length
    size = int(receipts[0].metrics["held"])
    assert {r.metrics["held"] for r in receipts} == {size}
    secure_round = _Round(coordinator, specs, size, coordinator.run, round_)
    return secure_round, *secure_round.run(**drops)


def test_three_sites_unmask_to_the_plain_sum_and_no_single_update_reaches_the_coordinator(world):
    coordinator, specs, _, tmp_path = world
    plain = _plain_dense(coordinator("plain"), specs)
    secure = coordinator("secure")
    receipts = [_train(secure, s, secure=True) for s in specs]
    held = sorted((tmp_path / "state-shop-a" / "secagg").rglob("*.npz"))
    assert [p.name for p in held] == ["held-update.npz"]  # the update stays at the site,
    assert {oct(p.stat().st_mode & 0o777) for p in held} == {"0o600"}  # for its owner only
    assert oct(held[0].parent.parent.stat().st_mode & 0o777) == "0o700"
    secure_round = _Round(secure, specs, int(receipts[0].metrics["held"]), secure.run)
    total, masked = secure_round.run()
    left = [p for p in (tmp_path / "state-shop-a" / "secagg").rglob("*") if p.is_file()]
    assert [p.name for p in left] == ["masked-updates"]  # secrets gone when done; what stays
    assert all(len(mark) == 64 for mark in left[0].read_text().split())  # is hashes (per run)
    np.testing.assert_allclose(total, sum(plain.values()), rtol=0, atol=1e-8)
    for dense in plain.values():
        encoded = encode(dense, n_clients=3, fraction_bits=FRACTION_BITS)
        for vector in masked.values():  # every masked input is far from every single update
            assert np.abs(decode(vector, fraction_bits=FRACTION_BITS) - dense).max() > 1e3
            assert not np.array_equal(vector, encoded)
        start = np.flatnonzero(dense)[0]  # and no stored file holds one in the clear
        pieces = (dense[start : start + 8].tobytes(), encoded[start : start + 8].tobytes())
        blobs = list(secure.transport.blobs.values()) + secure_round.received
        assert not any(piece in blob for piece in pieces for blob in blobs)


def test_a_sites_own_log_names_each_secure_step_message_and_the_api_line_does_not(world, caplog):
    """A site's operator reads in its own log what each secure-aggregation step sent: the
    protocol message's kind, its arrays by dtype and length (the masked vector) and its fields
    by name, never a value; the run's line on the Prefect API says only that it answered."""
    coordinator, specs, _, _ = world
    secure = coordinator("audited")
    with caplog.at_level(logging.INFO, logger="fedrec.site"):
        _, _, masked = _secure_round(secure, specs)
    steps = ("advertise", "share", "mask", "sign", "unmask")
    own = {}
    for step in steps:
        what = f"shop-a answered secagg {step} round 1 ("
        (own[step],) = [r.getMessage() for r in caplog.records if what in r.getMessage()]
    assert re.search(  # shop-a is client 0
        rf"; sent: message uint8\[\d+\] \(masked-input message: vector "
        rf"uint64\[{masked[0].size}\], fields client_id\); info seconds\)$",
        own["mask"],
    )
    assert (
        "(advertise-keys message, fields client_id, c_public, s_public, signature)"
        in (own["advertise"])
    )
    assert "(encrypted-shares message, fields sender, ciphertexts)" in own["share"]
    assert "(survivor-signature message, fields client_id, signature)" in own["sign"]
    assert "(unmask-shares message, fields client_id, b_shares, s_shares)" in own["unmask"]
    for line in own.values():  # the numbers left are the lengths of what was sent
        described = line.split(" s; ", 1)[1]
        assert not re.search(r"\d", re.sub(r"uint(8|64)\[\d+\]", "", described))
    api = [line for line in secure.transport.logs if "shop-a answered secagg" in line]
    assert len(api) == len(steps) and all(
        re.fullmatch(r"shop-a answered secagg \w+ round 1 \(\d+ bytes up\)", line) for line in api
    )


def test_a_site_refuses_round_keys_not_signed_by_a_registered_site_key(world):
    coordinator, specs, _, _ = world
    secure_round = _trained_round(coordinator, specs, "substituted")
    directory = secure_round.advertise()
    substituted = KeyDirectory(
        {**directory.c_public, 2: new_x25519()[1]}, directory.s_public, directory.signatures
    )
    with pytest.raises(SiteRefused, match="round keys of client 2: signature does not verify"):
        secure_round.ask("share", {0: substituted.to_bytes()})
    with pytest.raises(SiteRefused, match="phase 'aborted'"):  # its round is over
        secure_round.ask("share", {0: directory.to_bytes()})


def test_a_site_that_pins_its_peers_refuses_a_coordinator_lying_about_their_keys(world):
    coordinator, specs, sites, _ = world
    true_keys = frozenset(public_bytes(s.public_key) for s in specs)
    honest_spec = specs[2]
    specs[2] = SiteSpec(honest_spec.name, 2, generate_identity().public_key(), 10.0)
    liar = coordinator("lying")  # it would stand in for shop-c in the key agreement
    specs[2] = honest_spec

    receipt = _train(liar, specs[1], secure=True)  # unpinned: takes the coordinator's word
    sites["shop-a"].secure.peers = true_keys
    with pytest.raises(SiteRefused, match="key for client 2 is not one of this site's pinned"):
        _train(liar, specs[0], secure=True)

    assert receipt.metrics["held"] > 0
    # nor may one key stand for two peers (a holder of it would be two of the t survivors)
    specs[2] = SiteSpec(honest_spec.name, 2, specs[1].public_key, 10.0)
    twice = coordinator("one-key-twice")
    specs[2] = honest_spec
    with pytest.raises(SiteRefused, match="lists one key for more than one client"):
        _train(twice, specs[1], secure=True)
    honest = coordinator("honest")
    assert _train(honest, specs[0], secure=True).metrics["held"] > 0  # pinned, true keys: fine


def test_a_site_gone_after_masking_is_unmasked_from_the_others_shares(world):
    coordinator, specs, _, _ = world
    plain = _plain_dense(coordinator("plain"), specs)
    secure = coordinator("dropout-after-mask")
    _, total, _ = _secure_round(secure, specs, after_mask=(0, 1))
    np.testing.assert_allclose(total, sum(plain.values()), rtol=0, atol=1e-8)


def test_a_site_gone_before_masking_leaves_the_sum_of_the_others(world):
    coordinator, specs, _, _ = world
    plain = _plain_dense(coordinator("plain"), specs)
    secure = coordinator("dropout-before-mask")
    _, total, _ = _secure_round(secure, specs, masking=(0, 1))
    np.testing.assert_allclose(total, plain[0] + plain[1], rtol=0, atol=1e-8)


def test_a_coordinator_that_sends_one_state_for_two_rounds_gets_one_sum_over_it(world):
    coordinator, specs, _, _ = world
    plain = _plain_dense(coordinator("plain"), specs)
    secure = coordinator("same-state")
    _, total, _ = _secure_round(secure, specs)
    np.testing.assert_allclose(total, sum(plain.values()), rtol=0, atol=1e-8)
    # the attack: round 2 about the same state (so the same updates) without shop-c; the
    # difference of the two sums would be shop-c's update
    with pytest.raises(SiteRefused, match="masked this very update once already"):
        _secure_round(secure, specs, round_=2, masking=(0, 1))


PRIVATE = ExplicitMF(
    MFConfig(n_factors=3, clip_to=(1.0, 5.0), dp=UserLevelDP(noise_multiplier=2.0, shares=3))
)


def _releases(tmp_path, name):
    lines = (tmp_path / f"state-{name}" / "budget" / "entries.jsonl").read_text().splitlines()
    return [json.loads(line)["release"] for line in lines]


def test_a_private_site_counts_the_full_noise_only_for_an_update_it_holds_and_masks(world):
    coordinator, specs, sites, tmp_path = world
    sites["shop-a"].secure.peers = frozenset(public_bytes(s.public_key) for s in specs)
    secure = coordinator("private")
    _train(secure, specs[0], secure=True, family=PRIVATE)
    _train(secure, specs[1], secure=False, family=PRIVATE, round_=2)
    _train(secure, specs[2], secure=True, family=PRIVATE, round_=3)
    (masked,) = _releases(tmp_path, "shop-a")
    (clear,) = _releases(tmp_path, "shop-b")
    (unpinned,) = _releases(tmp_path, "shop-c")
    assert masked["noise_multiplier"] == pytest.approx(2.0)  # the sum carries the full noise
    assert clear["noise_multiplier"] == pytest.approx(2.0 / np.sqrt(3))  # its own share only
    # masked, but with its peers' keys taken from the coordinator, which could stand in for
    # them all and unmask this update alone: its own share is all that protects it
    assert unpinned["noise_multiplier"] == pytest.approx(2.0 / np.sqrt(3))
    secure = coordinator("private-low-threshold")
    receipts = [_train(secure, s, secure=True, family=PRIVATE) for s in specs]
    secure_round = _Round(secure, specs, int(receipts[0].metrics["held"]), secure.run,
                          family=PRIVATE)  # fmt: skip
    adverts = secure_round.ask("advertise", dict.fromkeys(range(3)))
    server = SecAggServer(secure_round.config)
    directory = server.key_directory([KeyAdvertisement.from_bytes(b) for b in adverts.values()])
    shares = secure_round.ask("share", dict.fromkeys(range(3), directory.to_bytes()))
    inboxes = server.route_shares([EncryptedShares.from_bytes(b) for b in shares.values()])
    with pytest.raises(SiteRefused, match="threshold 2 is below the 3 clients"):
        secure_round.ask("mask", {0: inboxes[0].to_bytes()})


def test_a_pinned_site_masks_only_among_peers_that_trained_with_the_same_noise(world):
    """The attack: shop-a pins its peers and counts the full noise of a round of t = 3 noise
    shares, while the coordinator asks shop-b and shop-c to train with a hundredth of the
    per-user bound, so that their shares add almost no noise and the sum carries about shop-a's
    share alone. Every round is bound to the settings its updates were made with."""
    coordinator, specs, sites, _ = world
    sites["shop-a"].secure.peers = frozenset(public_bytes(s.public_key) for s in specs)
    weak = ExplicitMF(MFConfig(n_factors=3, clip_to=(1.0, 5.0),
                               dp=UserLevelDP(noise_multiplier=2.0, max_items=1, shares=3)))  # fmt: skip
    secure = coordinator("unequal-noise")
    receipts = [_train(secure, s, secure=True, family=PRIVATE if s.client_id == 0 else weak)
                for s in specs]  # fmt: skip
    size = int(receipts[0].metrics["held"])
    # one round bound to shop-a's settings: the others refuse to join it
    strong = _Round(secure, specs, size, secure.run, family=PRIVATE)
    strong.ask("advertise", {0: None})
    with pytest.raises(SiteRefused, match="binds other training settings than this site's update"):
        strong.ask("advertise", {1: None})
    # each site told the binding of its own settings: shop-a cannot verify the others' keys
    secure = coordinator("unequal-noise-2")
    for s in specs:
        _train(secure, s, secure=True, family=PRIVATE if s.client_id == 0 else weak)
    strong = _Round(secure, specs, size, secure.run, family=PRIVATE)
    lax = _Round(secure, specs, size, secure.run, family=weak)
    adverts = strong.ask("advertise", {0: None}) | lax.ask("advertise", {1: None, 2: None})
    signed = [KeyAdvertisement.from_bytes(b) for b in adverts.values()]
    directory = KeyDirectory({a.client_id: a.c_public for a in signed},
                             {a.client_id: a.s_public for a in signed},
                             {a.client_id: a.signature for a in signed})  # fmt: skip
    with pytest.raises(SiteRefused, match="round keys of client 1: signature does not verify"):
        strong.ask("share", {0: directory.to_bytes()})


def test_a_site_masks_only_with_its_own_fixed_point_step_over_the_registrys_sites(world):
    """The attack: a coordinator that narrows the fixed-point range (62 fraction bits, or more
    clients than the federation has) makes the held update overflow when it is encoded, and
    the overflow's message named the update's largest value (an exact site's rating sum, to 6
    digits) in a refusal anyone on the API reads. The site refuses such a round at its first
    step, and an overflow names only the bound."""
    coordinator, specs, _, _ = world
    plain = _plain_dense(coordinator("plain"), specs)
    secure = coordinator("narrowed")
    receipts = [_train(secure, s, secure=True) for s in specs]
    size = int(receipts[0].metrics["held"])
    for changes in ({"fraction_bits": 62}, {"n_clients": 4}):
        narrowed = _Round(secure, specs, size, secure.run)
        narrowed.config = replace(narrowed.config, **changes)
        with pytest.raises(SiteRefused, match=f"masks with {FRACTION_BITS} over at most the 3 "):
            narrowed.ask("advertise", {0: None})
    honest = _Round(secure, specs, size, secure.run)  # the update is still held: it goes on
    total, _ = honest.run()
    np.testing.assert_allclose(total, sum(plain.values()), rtol=0, atol=1e-8)


def test_sites_of_a_hundred_million_rows_each_sum_exactly(world):
    """A site's largest value is a sum over its rows (its row count and error sum here; the
    rating sum of the mean phase, about 3.5 x the rows). With the step too fine for them
    (2^-36 left |x| < 2^27 / 3 = 4.5e7 for three sites) an honest round of three sites of 1e8
    rows each overflowed at its mask step and the run could not be trained."""
    from models.files import write_private
    from models.privacy.wire import pack, unpack

    coordinator, specs, _, tmp_path = world
    plain = _plain_dense(coordinator("plain"), specs)
    secure = coordinator("large")
    receipts = [_train(secure, s, secure=True) for s in specs]
    expected = []
    for spec, name in zip(specs, NAMES, strict=True):
        (held,) = (tmp_path / f"state-{name}" / "secagg").rglob("held-update.npz")
        fields, arrays = unpack(held.read_bytes())
        dense = arrays["dense"].copy()
        dense[-2:] = [8e7, 1e8]  # train_sse, train_n: a site of 1e8 rows
        write_private(held, pack(fields, {"dense": dense}))
        expected.append(plain[spec.client_id].copy())
        expected[-1][-2:] = dense[-2:]
    total, _ = _Round(secure, specs, int(receipts[0].metrics["held"]), secure.run).run()
    np.testing.assert_allclose(total, sum(expected), rtol=0, atol=1e-8)
    assert total[-1] == 3e8


def test_a_site_holds_no_update_for_a_registry_without_its_own_key(world, tmp_path):
    """A registry in the request that gives this site's client id another key, lacks the id,
    or is no object of ids to keys is refused in one line before the update is held: masking
    under it would let the holder of that key, not this site, sign for the site."""
    coordinator, specs, _, _ = world
    stranger = generate_identity().public_key()
    shop_a = specs[0]
    specs[0] = SiteSpec(shop_a.name, 0, stranger, 10.0)
    swapped = coordinator("another-key")
    specs[0] = shop_a
    with pytest.raises(SiteRefused, match="registry does not hold this site's key for client 0"):
        _train(swapped, shop_a, secure=True)

    secure = coordinator("tampered")
    registry = secure.secure_fields()["registry"]
    for tampered, reason in [
        ({c: k for c, k in registry.items() if c != "0"}, "does not hold this site's key"),
        (list(registry.values()), "registry must be an object of client ids to public keys"),
        ({**registry, "1": "not base64!"}, "registry entry '1' is not a public key"),
    ]:
        with pytest.raises(SiteRefused, match=reason):
            secure.exchange(shop_a, kind="train", phase="train", round_=1, family=ALS,
                            state=ALS.initial_state(len(ITEMS), seed=0),
                            secure=secure.secure_fields() | {"registry": tampered},
                            task_run_id=f"tampered-{reason[:12]}")  # fmt: skip
    assert not list((tmp_path / "state-shop-a" / "secagg").rglob("held-update.npz"))


def test_a_site_takes_each_later_step_only_in_the_round_it_joined(world):
    """A step whose round configuration differs from the one the site advertised its keys in
    (here a threshold raised after the keys went out) is refused; the site's round goes on
    under the configuration it joined and unmasks to the plain sum."""
    coordinator, specs, _, _ = world
    plain = _plain_dense(coordinator("plain"), specs)
    honest = _trained_round(coordinator, specs, "changed")
    directory = honest.advertise()
    changed = _Round(honest.coordinator, specs, honest.config.vector_size, honest.config.run_id)
    changed.config = replace(honest.config, threshold=3)
    with pytest.raises(SiteRefused, match="the secure round differs from the one this site joined"):
        changed.ask("share", {0: directory.to_bytes()})

    total, _ = honest.finish(directory)
    np.testing.assert_allclose(total, sum(plain.values()), rtol=0, atol=1e-8)


def test_a_retried_secure_step_gets_the_kept_message_and_another_server_message_a_refusal(world):
    """A step asked again with the same server message (a retried task, a restarted
    coordinator) gets the bytes the site sent the first time, so the round can go on; asked
    with another message, the site refuses: it answers each step once."""
    coordinator, specs, _, _ = world
    plain = _plain_dense(coordinator("plain"), specs)
    secure_round = _trained_round(coordinator, specs, "retried")
    directory = secure_round.advertise()
    first = secure_round.received[0]
    assert secure_round.ask("advertise", {0: None})[0] == first
    shared = secure_round.ask("share", {0: directory.to_bytes()})[0]
    assert secure_round.ask("share", {0: directory.to_bytes()})[0] == shared
    other = KeyDirectory(
        {**directory.c_public, 2: new_x25519()[1]}, directory.s_public, directory.signatures
    )
    with pytest.raises(SiteRefused, match="was answered for another server message"):
        secure_round.ask("share", {0: other.to_bytes()})

    total, _ = secure_round.finish(directory)
    np.testing.assert_allclose(total, sum(plain.values()), rtol=0, atol=1e-8)
