"""A site's events subscriber against a real Prefect API: which artifacts wake it, how soon."""

import threading
import time
from types import SimpleNamespace

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.settings import PREFECT_API_URL

from fedrec.sites.process import Site
from fedrec.sites.transport import request_key


def _post(key: str) -> None:
    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(key=key, type="markdown", data="a request"))


def test_a_site_is_woken_by_each_request_for_it_and_by_no_other(prefect_server, monkeypatch):
    api = PREFECT_API_URL.value()
    monkeypatch.setenv("PREFECT_API_URL", api)  # listen() sets it; restored after the test
    # listen() reads only these two of the site
    site = SimpleNamespace(options=SimpleNamespace(prefect_api=api), name="shop-a")
    wake, stop = threading.Event(), threading.Event()
    listener = threading.Thread(target=Site.listen, args=(site, wake, stop), daemon=True)
    listener.start()
    try:
        started = time.monotonic()  # the subscription is up once a posted request wakes it
        while not wake.is_set() and time.monotonic() - started < 60:
            _post(request_key("shop-a"))
            wake.wait(1.0)
        assert wake.is_set(), "no request for shop-a woke it within 60 s"

        quiet = time.monotonic() + 60  # the posts above may still be on their way: wait them out
        while time.monotonic() < quiet:
            wake.clear()
            if not wake.wait(2.0):
                break
        assert not wake.is_set(), "still woken by the posts for shop-a after 60 s"
        _post(request_key("shop-b"))
        assert not wake.wait(3.0), "woken by a request for another site"
        # each later request wakes it too, well within the 10 s a reconnection would take
        for _ in range(2):
            wake.clear()
            _post(request_key("shop-a"))
            assert wake.wait(5.0), "a later request did not wake the site within 5 s"
    finally:
        stop.set()
        _post(request_key("shop-a"))  # the subscriber sees stop at its next event
        listener.join(20)
    assert not listener.is_alive()
