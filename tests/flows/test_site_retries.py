"""Which failed exchanges with a real site a proxy task retries: not one whose site had its
whole deadline, nor one the site refused, nor any once the run stopped; a transient failure,
yes."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prefect import flow
from prefect.utilities.annotations import quote

from fedrec.sites.coordinator import RunStopped, SiteRefused
from models.sites.registry import SiteSpec


class _Unanswered:
    """The coordinator's side of an exchange whose every attempt ends with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error, self.attempts = error, 0

    def exchange(self, site, **request):
        self.attempts += 1
        raise self.error


@pytest.mark.parametrize(
    ("error", "attempts"),
    [
        (TimeoutError("shop-a: no answer to train round 1 within 600 s"), 1),
        (SiteRefused("shop-a refused train round 1: budget spent"), 1),
        (RunStopped("shop-a: train round 1: the run stopped waiting"), 1),
        (ConnectionError("the Prefect API did not answer"), 3),
    ],
)
def test_a_site_that_had_its_deadline_is_not_asked_again(prefect_server, error, attempts):
    from tasks.remote import train_site

    link = _Unanswered(error)
    site = SiteSpec("shop-a", 0, Ed25519PrivateKey.generate().public_key())

    @flow
    def one_round() -> None:
        future = train_site.with_options(retries=2, retry_delay_seconds=0).submit(
            link=quote(link), site=site, family=None, state=None, phase="als", round_=1
        )
        future.wait()

    one_round()
    assert link.attempts == attempts
