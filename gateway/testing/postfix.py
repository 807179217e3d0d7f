"""A throwaway Postfix instance on loopback ports, for integration tests.

Debian's Postfix runs from a generated config directory (``postfix -c DIR``)
with its queue, data and Maildir under one temporary directory, listening on
127.0.0.1 only, logging to a file (``maillog_file``), delivering every
recipient of the virtual domains into one Maildir. Starting a Postfix master
needs root (it drops to ``mail_owner`` itself); the caller checks that first.

The deploy snippets in ``deploy/postfix/`` are used verbatim: ``snippet()``
only swaps their ports (25, 10025, 10026) for the test's free ports.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.testing.services import free_port

__all__ = ["DEPLOY_POSTFIX", "PostfixError", "PostfixInstance", "free_port", "snippet"]

DEPLOY_POSTFIX = Path(__file__).resolve().parents[2] / "deploy" / "postfix"

# The internal services of Debian's master.cf, unchrooted: the instance lives
# in a temp dir without the chroot's copies of /etc files.
_BASE_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       1       1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


_QUEUE_DIRS = (
    "active", "bounce", "corrupt", "defer", "deferred", "flush",
    "hold", "incoming", "private", "saved", "trace",
)  # fmt: skip


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _daemon_directory(postfix: str) -> str:
    """Where the Postfix daemons live (``postconf -dh daemon_directory``, slow: ~2 s)."""
    if Path("/usr/lib/postfix/sbin/master").exists():  # Debian's
        return "/usr/lib/postfix/sbin"
    postconf = str(Path(postfix).with_name("postconf"))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [postconf, "-dh", "daemon_directory"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if out:
            return out
    return "/usr/lib/postfix/sbin"


class PostfixError(RuntimeError):
    """Postfix refused the generated config or did not start; the message has its output."""


def snippet(mode: str, name: str, *, public: int = 25, gateway: int, back: int) -> str:
    """``deploy/postfix/<mode>/<name>`` with the documented ports replaced.

    ``public`` replaces the ``smtp inet`` service (port 25), ``gateway`` the
    gateway's 10025, ``back`` the return smtpd's 10026.
    """
    text = (DEPLOY_POSTFIX / mode / name).read_text(encoding="utf-8")
    text = re.sub(r"^smtp(\s+)inet", rf"127.0.0.1:{public}\1inet", text, flags=re.M)
    text = text.replace("127.0.0.1]:10025", f"127.0.0.1]:{gateway}")
    text = text.replace("127.0.0.1:10025", f"127.0.0.1:{gateway}")
    return text.replace("127.0.0.1:10026", f"127.0.0.1:{back}")


class PostfixInstance:
    """One Postfix master with its own config, queue and Maildir under a temp dir.

    ``main_cf`` and ``master_cf`` are appended to the generated base files
    (later main.cf settings win). Mail for ``domains`` lands in ``maildir``.
    """

    def __init__(
        self,
        *,
        main_cf: str = "",
        master_cf: str = "",
        domains: tuple[str, ...] = ("example.org",),
        hostname: str = "postfix.test",
        postfix: str = "postfix",
    ) -> None:
        self.main_cf = main_cf
        self.master_cf = master_cf
        self.domains = domains
        self.hostname = hostname
        self.postfix = shutil.which(postfix) or shutil.which(postfix, path="/usr/sbin") or postfix
        self.master = _daemon_directory(self.postfix) + "/master"
        self.root = Path(tempfile.mkdtemp(prefix="gw-postfix-"))
        # Postfix daemons (mail_owner) must traverse into the Maildir.
        os.chmod(self.root, 0o755)  # noqa: S103 -- a test dir; the daemons run as mail_owner
        self.config_dir = self.root / "etc"
        self.maildir = self.root / "mail" / "inbox"
        self.logfile = self.root / "maillog"
        self._started = False

    def _write_config(self) -> None:
        owner = pwd.getpwnam("postfix")
        for sub in ("etc", "spool", "data", "mail"):
            (self.root / sub).mkdir(exist_ok=True)
        for sub in ("data", "mail"):
            os.chown(self.root / sub, owner.pw_uid, owner.pw_gid)
        main = f"""\
compatibility_level = 3.6
queue_directory = {self.root}/spool
data_directory = {self.root}/data
mail_owner = postfix
maillog_file = {self.logfile}
maillog_file_prefixes = {self.root}
myhostname = {self.hostname}
mydomain = test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {" ".join(self.domains)}
virtual_mailbox_base = {self.root}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:{owner.pw_uid}
virtual_gid_maps = static:{owner.pw_gid}
biff = no
smtputf8_enable = yes
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_host_lookup = native
disable_dns_lookups = yes
"""
        (self.config_dir / "main.cf").write_text(main + "\n" + self.main_cf, encoding="utf-8")
        (self.config_dir / "master.cf").write_text(
            _BASE_MASTER_CF + "\n" + self.master_cf, encoding="utf-8"
        )

    def _make_queue(self) -> None:
        """The queue tree ``postfix check`` would create (see ``postfix-files``), minus its 2 s."""
        owner = pwd.getpwnam("postfix")
        postdrop = grp.getgrnam("postdrop").gr_gid if _has_group("postdrop") else owner.pw_gid
        spool = self.root / "spool"
        for name, uid, gid, mode in (
            *((d, owner.pw_uid, owner.pw_gid, 0o700) for d in _QUEUE_DIRS),
            ("maildrop", owner.pw_uid, postdrop, 0o730),
            ("public", owner.pw_uid, postdrop, 0o710),
            ("pid", 0, 0, 0o755),
        ):
            path = spool / name
            path.mkdir(exist_ok=True)
            os.chown(path, uid, gid)
            os.chmod(path, mode)

    def _run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.postfix, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> PostfixInstance:
        """Write the config, check it and start the master; wait until it logs readiness."""
        self._write_config()
        self._make_queue()
        # `master -w` returns once the daemon has bound its listeners; `postfix
        # start` would add seconds of `postfix check` for the same result.
        result = subprocess.run(
            [self.master, "-c", str(self.config_dir), "-w"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise PostfixError(
                f"postfix master failed to start ({result.returncode}): "
                f"{result.stdout}{result.stderr}{self.log()}\n"
                f"check the config with: postfix -c {self.config_dir} check"
            )
        self._started = True
        return self

    def stop(self) -> None:
        """Stop the master (if started) and remove the temp dir."""
        if self._started:
            pid = self._master_pid()
            self._run("abort", timeout=15)
            end = time.monotonic() + 10
            while pid is not None and _alive(pid) and time.monotonic() < end:
                time.sleep(0.02)
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        """The master's process id while it runs (its daemons are its children)."""
        return self._master_pid()

    def _master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.root / "spool" / "pid" / "master.pid").read_text().split()[0])
        return None

    def __enter__(self) -> PostfixInstance:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        """The instance's mail log so far (empty before the first line)."""
        with contextlib.suppress(FileNotFoundError):
            return self.logfile.read_text(encoding="utf-8", errors="replace")
        return ""

    def wait_for_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Wait for a log line matching the regex ``pattern``; fail with the log."""
        end = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log())
            if match:
                return match
            if time.monotonic() > end:
                raise AssertionError(f"no log line matching {pattern!r}:\n{self.log()}")
            time.sleep(0.05)

    def mailbox(self) -> list[bytes]:
        """Delivered messages (Maildir ``new/``), oldest first, as Postfix stored them."""
        new = self.maildir / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime, p.name))
        return [p.read_bytes() for p in files]

    def wait_for_mail(self, count: int, timeout: float = 15.0) -> list[bytes]:
        """Wait until at least ``count`` messages were delivered; fail with the log."""
        end = time.monotonic() + timeout
        while True:
            messages = self.mailbox()
            if len(messages) >= count:
                return messages
            if time.monotonic() > end:
                raise AssertionError(
                    f"{len(messages)} of {count} messages delivered:\n{self.log()}"
                )
            time.sleep(0.05)
