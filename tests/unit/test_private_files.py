"""Private files (secrets, identity keys, held updates) are read only when no one else could have
written them: each attack below swaps or shares a secret, and each is shown to work against a
plain read before the check refuses it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from models.files import UnsafeFile, read_private, write_private

ROOT = os.geteuid() == 0
NOBODY = 65534
needs_root = pytest.mark.skipif(not ROOT, reason="changing a file's owner needs root")


def _secret(folder: Path) -> Path:
    path = folder / "secret"
    write_private(path, os.urandom(32))
    return path


def _swap(path: Path, known: bytes) -> None:
    """What a writer of ``path``'s folder can do without reading the secret: replace it."""
    path.unlink()
    path.write_bytes(known)
    path.chmod(0o600)


def test_a_private_file_in_private_folders_is_read(tmp_path):
    path = _secret(tmp_path / "home")
    assert read_private(path, "ledger secret") == path.read_bytes()
    with pytest.raises(FileNotFoundError):
        read_private(tmp_path / "home" / "missing", "ledger secret")


def test_a_secret_swapped_in_a_folder_every_user_may_write_is_refused(tmp_path):
    folder = tmp_path / "shared"
    path = _secret(folder)
    folder.chmod(0o777)
    known = bytes(range(32))
    _swap(path, known)
    assert path.read_bytes() == known  # a plain read now uses a secret the attacker knows
    with pytest.raises(UnsafeFile, match=f"reached through {folder}, which every user may write"):
        read_private(path, "ledger secret")
    folder.chmod(0o1777)  # sticky, as /tmp: only an entry's owner may replace it
    assert read_private(path, "ledger secret") == known


def test_a_symlinked_folder_is_checked_where_the_link_sits_and_where_it_leads(tmp_path):
    real = tmp_path / "real"
    path = _secret(real)
    drop = tmp_path / "drop"
    drop.mkdir(mode=0o700)
    (drop / "home").symlink_to(real, target_is_directory=True)
    linked = drop / "home" / "secret"
    assert read_private(linked, "ledger secret") == path.read_bytes()  # both ends private

    drop.chmod(0o777)  # anyone may now point drop/home at a folder of their own
    elsewhere = tmp_path / "elsewhere"
    write_private(elsewhere / "secret", bytes(32))
    (drop / "home").unlink()
    (drop / "home").symlink_to(elsewhere, target_is_directory=True)
    assert linked.read_bytes() == bytes(32)  # the plain read follows the attacker's link
    with pytest.raises(UnsafeFile, match=f"reached through {drop}, which every user may write"):
        read_private(linked, "ledger secret")

    drop.chmod(0o700)
    real.chmod(0o777)  # the link's target folder shared instead
    (drop / "home").unlink()
    (drop / "home").symlink_to(real, target_is_directory=True)
    with pytest.raises(UnsafeFile, match=f"reached through {real}, which every user may write"):
        read_private(linked, "ledger secret")


def test_a_second_name_for_the_secret_is_refused(tmp_path):
    path = _secret(tmp_path / "home")
    os.link(path, tmp_path / "kept-copy")  # a hard link survives a chmod or removal of the first
    with pytest.raises(UnsafeFile, match="has 2 names"):
        read_private(path, "ledger secret")
    (tmp_path / "kept-copy").unlink()
    assert len(read_private(path, "ledger secret")) == 32


def test_a_file_link_and_a_shared_mode_are_refused(tmp_path):
    path = _secret(tmp_path / "home")
    (tmp_path / "home" / "link").symlink_to(path)
    with pytest.raises(UnsafeFile, match="is a symbolic link; refused"):
        read_private(tmp_path / "home" / "link", "ledger secret")
    path.chmod(0o640)
    with pytest.raises(UnsafeFile, match="mode 0640: others may read or write it; it must be 0600"):
        read_private(path, "ledger secret")
    with pytest.raises(UnsafeFile, match="not a regular file"):
        read_private(tmp_path / "home", "ledger secret")


@needs_root
def test_a_secret_or_folder_another_user_owns_is_refused(tmp_path):
    folder = tmp_path / "home"
    path = _secret(folder)
    os.chown(path, NOBODY, NOBODY)  # planted by another user, mode 0600: root reads it anyway
    assert len(path.read_bytes()) == 32
    with pytest.raises(UnsafeFile, match=rf"belongs to user nobody \(uid {NOBODY}\), not to"):
        read_private(path, "ledger secret")
    os.chown(path, 54321, 0)  # a uid the system does not name
    with pytest.raises(UnsafeFile, match=r"belongs to uid 54321, not to"):
        read_private(path, "ledger secret")
    os.chown(path, 0, 0)
    os.chown(folder, NOBODY, NOBODY)  # the folder's owner may replace anything in it
    with pytest.raises(UnsafeFile, match=f"reached through {folder}, which belongs to"):
        read_private(path, "ledger secret")
    os.chown(folder, 0, NOBODY)
    folder.chmod(0o770)  # writable by a group this user does not have to itself
    with pytest.raises(UnsafeFile, match=r"the members of group .* may write to"):
        read_private(path, "ledger secret")
    os.chown(folder, 0, 0)  # root's own group: no one else's
    assert len(read_private(path, "ledger secret")) == 32


def test_the_product_refuses_its_secrets_in_a_shared_folder(tmp_path):
    """The ledger's secret, an identity key and a site's secret go through the same check."""
    from fedrec.sites.budget import SiteBudget
    from models.privacy.identity import generate_identity, load_identity, save_identity
    from tasks.tracking import BudgetError, ledger_secret

    folder = tmp_path / "store"
    ledger = folder / "ledger.key"
    ledger_secret(ledger, create=True)
    private, _ = save_identity(generate_identity(), folder, 3)
    site = tmp_path / "site"
    SiteBudget(site, np.array(["u1", "u2"]), max_epsilon=8.0)
    for shared in (folder, site):
        shared.chmod(0o777)
    with pytest.raises(BudgetError, match=r"which every user may write.*--dp-ledger-secret"):
        ledger_secret(ledger, create=False)
    with pytest.raises(PermissionError, match="which every user may write"):
        load_identity(private)
    with pytest.raises(PermissionError, match="which every user may write"):
        SiteBudget(site, np.array(["u1", "u2"]), max_epsilon=8.0)


def test_a_group_someone_else_has_as_primary_group_is_no_private_group(tmp_path, monkeypatch):
    import grp
    import pwd
    from types import SimpleNamespace

    folder = tmp_path / "home"
    path = _secret(folder)
    me = pwd.getpwuid(os.geteuid())
    os.chown(folder, -1, me.pw_gid)
    folder.chmod(0o770)  # umask 002's folders, in the user's own group
    if grp.getgrgid(me.pw_gid).gr_name != me.pw_name or grp.getgrgid(me.pw_gid).gr_mem:
        pytest.skip("this user's primary group is not a user-private group")
    assert len(read_private(path, "ledger secret")) == 32
    carol = SimpleNamespace(pw_name="carol", pw_gid=me.pw_gid)  # useradd -g <user>: not listed
    everyone = pwd.getpwall()
    monkeypatch.setattr(pwd, "getpwall", lambda: [*everyone, carol])
    with pytest.raises(UnsafeFile, match=rf"members of group {me.pw_name} \(carol\) may write"):
        read_private(path, "ledger secret")


@needs_root
def test_a_file_this_user_cannot_open_is_named_for_its_owner_not_denied(tmp_path, monkeypatch):
    import errno

    path = _secret(tmp_path / "home")
    os.chown(path, NOBODY, NOBODY)
    real_open = os.open

    def denied(target, *args, **kwargs):  # what a user other than root meets
        if Path(target) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(target))
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UnsafeFile, match=f"belongs to .*uid {NOBODY}"):
        read_private(path, "ledger secret")


def test_nothing_private_is_written_where_others_could_swap_it(tmp_path):
    from fedrec.cli_errors import UserError, classify
    from fedrec.sites.budget import SiteBudget
    from models.files import check_private_path
    from models.privacy.identity import generate_identity, save_identity
    from tasks.tracking import BudgetError, ledger_secret

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeFile, match="which every user may write") as refused:
        write_private(shared / "held.npz", b"x")
    assert isinstance(classify(refused.value), UserError)  # exit status 2, the line alone
    with pytest.raises(UnsafeFile, match="which every user may write"):
        check_private_path(shared / "new" / "secret", "ledger secret")  # a folder still to make
    with pytest.raises(BudgetError, match=r"which every user may write.*--dp-ledger-secret"):
        ledger_secret(shared / "store" / ".fedrec-ledger.key", create=True)
    with pytest.raises(PermissionError, match="which every user may write"):
        save_identity(generate_identity(), shared / "keys", 3)
    with pytest.raises(PermissionError, match="which every user may write"):
        SiteBudget(shared / "site" / "budget", np.array(["u1"]), max_epsilon=8.0)
    assert list(shared.iterdir()) == []  # no secret, key, budget or folder was made


def test_what_is_made_for_private_files_is_the_owners_alone(tmp_path):
    """The folders write_private makes (every missing one on the way), an appended ledger's
    file and a folder's lock file are made 0700 and 0600, whatever the umask. Under umask 0,
    ``mkdir -p`` made the folders above the last one 0777: a site's first start then refused
    the state folder it had just made, as writable by every user."""
    from fedrec.sites.budget import SiteBudget
    from models.files import append_private, folder_lock
    from models.privacy.identity import generate_identity, load_identity, save_identity
    from tasks.tracking import ledger_secret

    old = os.umask(0)
    try:
        write_private(tmp_path / "state" / "budget" / "secret", b"s")
        append_private(tmp_path / "state" / "entries.jsonl", "{}")
        with folder_lock(tmp_path / "state"):
            pass
        site = SiteBudget(tmp_path / "site" / "budget", np.array(["u1"]), max_epsilon=8.0)
        key, _ = save_identity(generate_identity(), tmp_path / "keys" / "site-a", 0)
        secret = ledger_secret(tmp_path / "store" / "mlruns" / ".fedrec-ledger.key", create=True)
    finally:
        os.umask(old)
    assert len(site.secret) == 32 and len(secret) == 32 and load_identity(key) is not None
    for made in ("site", "keys", "store", "store/mlruns"):
        assert oct((tmp_path / made).stat().st_mode & 0o777) == "0o700", made
    modes = {
        path.relative_to(tmp_path).as_posix(): oct(path.stat().st_mode & 0o777)
        for path in sorted((tmp_path / "state").rglob("*"))
    }
    assert modes == {
        "state/.lock": "0o600",
        "state/budget": "0o700",
        "state/budget/secret": "0o600",
        "state/entries.jsonl": "0o600",
    }
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"


def test_an_identity_given_as_a_folder_or_a_link_to_the_public_key_is_refused_as_such(tmp_path):
    """Only the public key itself, a regular file, is read past the private-file check (to say
    which file was meant); a folder or a link is refused by that check, in its own words."""
    from models.privacy.identity import generate_identity, load_identity, save_identity

    _, public = save_identity(generate_identity(), tmp_path, 3)
    link = tmp_path / "link.pub"
    link.symlink_to(public)
    (tmp_path / "folder.key").mkdir()

    with pytest.raises(ValueError, match=r"client-3\.pub is a public key; an identity is"):
        load_identity(public)
    with pytest.raises(UnsafeFile, match="the identity key is a symbolic link; refused"):
        load_identity(link)
    with pytest.raises(UnsafeFile, match="the identity key is not a regular file; refused"):
        load_identity(tmp_path / "folder.key")
