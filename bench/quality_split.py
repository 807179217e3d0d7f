"""How bench.quality divides the corpus into training and test mail.

A random split per file flatters a filter: the same newsletter, mailing list
or spam campaign lands on both sides, and whatever was learned (tokens,
rule weights) about that sender is then "confirmed" on its own siblings.
Three splits, each a :class:`Split` (per class: training and test files):

- ``random``: each class shuffled with a seeded RNG, cut at the training
  fraction (the benchmark's original split; kept for comparison).
- ``grouped``: no sender domain, List-Id or near-duplicate body is on both
  sides. Messages are joined into groups by their list (List-Id) or, without
  one, their sender's registrable domain, and by near-duplicate bodies
  (Jaccard similarity of word 5-shingles >= ``NEAR_DUPLICATE``); whole
  groups go to one side. A person posts to several lists, so joining on
  every key at once chains most of the mailing-list ham into one group;
  instead, after the groups are placed, every *training* message that still
  shares any key (its sender or its list) with a test message is left out of
  training (``purged``). Test mail is then strictly unseen in that sense.
- ``time``: per class, the oldest messages train and the newest are tested,
  ordered by arrival (the topmost Received time stamp, else Date): what a
  site sees when it trains on last month's mail.

Sender keys: the registrable domain of the From address, except for mailbox
providers (``MAILBOX_PROVIDERS``: thousands of unrelated people share
hotmail.com) and the corpus's anonymised domain (``taint.org``, which
replaced many senders' real domains), where the key is the whole address
(for anonymised addresses with the display name, since ``rssfeeds@`` stands
for every RSS feed the collector read).
"""

from __future__ import annotations

import collections
import email.parser
import email.policy
import email.utils
import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from email.message import EmailMessage, Message
from pathlib import Path

__all__ = [
    "CLASSES",
    "MAILBOX_PROVIDERS",
    "NEAR_DUPLICATE",
    "SPLITS",
    "MessageInfo",
    "Split",
    "arrival_time",
    "group_messages",
    "grouped_split",
    "jaccard",
    "load_infos",
    "message_info",
    "near_duplicate_pairs",
    "random_split",
    "sender_key",
    "shingles",
    "time_split",
]

CLASSES = ("spam", "ham", "hard-ham")
SPLITS = ("random", "grouped", "time")
NEAR_DUPLICATE = 0.5  # Jaccard similarity of shingle sets from which two bodies are one group
SHINGLE_WORDS = 5
MAX_SHINGLE_WORDS = 5_000  # words of a body shingled (a bound; campaigns differ early)
COMMON_SHINGLE = 50  # a shingle in more messages than this is boilerplate, not evidence
ANONYMISED = ("taint.org",)  # the public corpus's stand-in for collectors' and senders' domains
# Consumer mailbox providers of the corpus's years and since: a domain, not a sender.
MAILBOX_PROVIDERS = frozenset(
    {
        "aol.com",
        "att.net",
        "attbi.com",
        "bigfoot.com",
        "bluemail.dk",
        "btinternet.com",
        "caramail.com",
        "comcast.net",
        "compuserve.com",
        "earthlink.net",
        "eircom.net",
        "email.com",
        "eudoramail.com",
        "excite.com",
        "flashmail.com",
        "gmail.com",
        "gmx.de",
        "gmx.net",
        "hotmail.com",
        "hotmail.co.uk",
        "icloud.com",
        "iol.ie",
        "juno.com",
        "lycos.com",
        "mail.com",
        "mail.ru",
        "mindspring.com",
        "msn.com",
        "netscape.net",
        "netzero.net",
        "outlook.com",
        "post.com",
        "prodigy.net",
        "terra.es",
        "usa.net",
        "wanadoo.fr",
        "web.de",
        "yahoo.ca",
        "yahoo.co.uk",
        "yahoo.com",
        "yahoo.fr",
        "yandex.ru",
    }
)

_PARSER = email.parser.BytesParser(policy=email.policy.default)
_LIST_ID = re.compile(r"<([^<>\s]+)>")
_WORD = re.compile(r"\w+")
_RECEIVED_DATE = re.compile(r";\s*([^;]+?)\s*$")


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What the splits need to know about one corpus message."""

    path: Path
    label: str  # spam | ham | hard-ham
    sender: str  # "domain:example.com" or "address:x@hotmail.com" ("" when there is none)
    list_id: str  # "list:fork.xent.com" or ""
    arrival: float  # POSIX seconds (0.0 when no time stamp can be read)
    shingles: frozenset[int] = field(repr=False)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every identity this message shares with others of its origin."""
        return tuple(k for k in (self.sender, self.list_id) if k)

    @property
    def primary(self) -> str:
        """The key that places the message's group: its list, else its sender."""
        return self.list_id or self.sender


@dataclass
class Split:
    """Per class, the files to train on and to test; plus how they were chosen."""

    kind: str
    seed: int
    train: dict[str, list[Path]]
    test: dict[str, list[Path]]
    purged: dict[str, int] = field(default_factory=dict)  # training files left out (grouped)
    groups: dict[str, str] = field(default_factory=dict)  # file name -> group id (grouped)

    def as_pairs(self) -> dict[str, tuple[list[Path], list[Path]]]:
        return {c: (self.train.get(c, []), self.test.get(c, [])) for c in CLASSES}


# -- per-message facts ------------------------------------------------------------


def _registrable(domain: str) -> str:
    from gateway.content import registrable_domain

    return registrable_domain(domain)


def sender_key(from_value: str) -> str:
    """The sender identity of a From field value (see the module docstring)."""
    display, address = email.utils.parseaddr(from_value)
    address = address.strip().lower()
    local, at, domain = address.rpartition("@")
    domain = domain.strip(".<> ")
    if not at or not domain or not local:
        return f"address:{address}" if address else ""
    if domain.endswith(ANONYMISED):
        return f"address:{address}|{display.strip().lower()}"
    rdomain = _registrable(domain)
    if rdomain in MAILBOX_PROVIDERS:
        return f"address:{address}"
    return f"domain:{rdomain}"


def list_key(list_id_value: str) -> str:
    """``"Friends of Rohit Khare <fork.xent.com>"`` -> ``"list:fork.xent.com"``."""
    value = " ".join(list_id_value.split())
    if not value:
        return ""
    m = _LIST_ID.search(value)
    return "list:" + (m.group(1) if m else value).lower()


def arrival_time(message: Message) -> float:
    """The topmost Received time stamp (the collector's), else Date; 0.0 if neither parses."""
    m = _RECEIVED_DATE.search(_header(message, "received"))
    when = _parse_date(m.group(1)) if m else None
    if when is not None:
        return when
    when = _parse_date(_header(message, "date"))
    return when if when is not None else 0.0


def _parse_date(value: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(" ".join(value.split()))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if not 1990 <= when.year <= 2100:
        return None
    return when.timestamp()


def _header(message: Message, name: str) -> str:
    """The first field ``name`` as raw text (no structured parsing: corpus mail is malformed)."""
    for key, value in message.raw_items():
        if key.lower() == name:
            return str(value)
    return ""


def shingles(text: str, width: int = SHINGLE_WORDS) -> frozenset[int]:
    """Hashed word ``width``-grams of lower-cased text: near-duplicates share most of them."""
    words = _WORD.findall(text.lower())[:MAX_SHINGLE_WORDS]
    if not words:
        return frozenset()
    if len(words) < width:
        return frozenset({_hash(" ".join(words))})
    return frozenset(_hash(" ".join(words[i : i + width])) for i in range(len(words) - width + 1))


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    if not a and not b:
        return 0.0
    return len(a & b) / len(a | b)


def message_info(path: Path, label: str, raw: bytes | None = None) -> MessageInfo:
    """Read one message's sender, list, arrival time and body shingles."""
    from gateway.api import Context
    from gateway.content import body_text

    raw = path.read_bytes() if raw is None else raw
    message = _PARSER.parsebytes(raw)
    assert isinstance(message, EmailMessage)
    ctx = Context(
        client_ip=None,
        helo="",
        mail_from="",
        rcpt_to=(),
        raw=raw,
        message=message,
        resolver=None,  # type: ignore[arg-type]  # body_text never resolves
    )
    return MessageInfo(
        path=path,
        label=label,
        sender=sender_key(_header(message, "from")),
        list_id=list_key(_header(message, "list-id")),
        arrival=arrival_time(message),
        shingles=shingles(body_text(ctx)),
    )


def load_infos(root: Path) -> list[MessageInfo]:
    """Every message of the unpacked corpus (``root/<class>/*``), in sorted order."""
    return [
        message_info(path, label)
        for label in CLASSES
        for path in sorted((root / label).iterdir())
        if path.is_file()
    ]


# -- grouping ---------------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_pairs(
    infos: Sequence[MessageInfo], threshold: float = NEAR_DUPLICATE
) -> list[tuple[int, int]]:
    """Index pairs whose bodies are near-duplicates (Jaccard >= ``threshold``), each once.

    Candidates come from an inverted index of the shingles that are rare (in
    at most ``COMMON_SHINGLE`` messages: list footers and signatures would
    make every pair a candidate). A pair is compared only when its shared
    rare shingles plus the common ones it could share can reach the
    threshold, so the pruning never loses a pair; messages with identical
    shingle sets (a campaign sent many times) are paired directly.
    """
    index: dict[int, list[int]] = collections.defaultdict(list)
    for i, info in enumerate(infos):
        for s in info.shingles:
            index[s].append(i)
    common = {s for s, members in index.items() if len(members) > COMMON_SHINGLE}
    n_common = [len(info.shingles & common) for info in infos]
    shared: collections.Counter[tuple[int, int]] = collections.Counter()
    for members in index.values():
        if 1 < len(members) <= COMMON_SHINGLE:
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    shared[(members[x], members[y])] += 1
    pairs: set[tuple[int, int]] = set()
    first: dict[frozenset[int], int] = {}
    for i, info in enumerate(infos):
        if info.shingles:
            j = first.setdefault(info.shingles, i)
            if j != i:
                pairs.add((j, i))
    for (a, b), n in shared.items():
        sa, sb = infos[a].shingles, infos[b].shingles
        need = threshold * max(len(sa), len(sb))  # J >= t implies |A & B| >= t * max(|A|, |B|)
        if n + min(n_common[a], n_common[b]) >= need and jaccard(sa, sb) >= threshold:
            pairs.add((a, b))
    return sorted(pairs)


def group_messages(infos: Sequence[MessageInfo], threshold: float = NEAR_DUPLICATE) -> list[int]:
    """Per message, its group (the smallest index in it): same primary key or near-duplicate."""
    uf = _UnionFind(len(infos))
    first: dict[str, int] = {}
    for i, info in enumerate(infos):
        if info.primary:
            uf.union(i, first.setdefault(info.primary, i))
    for a, b in near_duplicate_pairs(infos, threshold):
        uf.union(a, b)
    return [uf.find(i) for i in range(len(infos))]


# -- the splits -------------------------------------------------------------------


def random_split(infos: Sequence[MessageInfo], seed: int, train_fraction: float) -> Split:
    """Per class: a seeded shuffle of the sorted file names, cut at ``train_fraction``."""
    train: dict[str, list[Path]] = {}
    test: dict[str, list[Path]] = {}
    for label in CLASSES:
        files = sorted(i.path for i in infos if i.label == label)
        random.Random(f"{seed}:{label}").shuffle(files)
        cut = round(len(files) * train_fraction)
        train[label], test[label] = files[:cut], files[cut:]
    return Split("random", seed, train, test)


def time_split(infos: Sequence[MessageInfo], train_fraction: float) -> Split:
    """Per class: the oldest ``train_fraction`` by arrival train, the newer rest is tested."""
    train: dict[str, list[Path]] = {}
    test: dict[str, list[Path]] = {}
    for label in CLASSES:
        ordered = sorted((i for i in infos if i.label == label), key=lambda i: (i.arrival, i.path))
        cut = round(len(ordered) * train_fraction)
        train[label] = [i.path for i in ordered[:cut]]
        test[label] = [i.path for i in ordered[cut:]]
    return Split("time", 0, train, test)


PLACEMENT_TRIES = 50  # seeded random placements tried; the best balanced one is kept


def grouped_split(
    infos: Sequence[MessageInfo],
    seed: int,
    train_fraction: float,
    groups: Sequence[int] | None = None,
) -> Split:
    """Whole groups to one side, class shares near ``train_fraction``; then the purge.

    Placement: groups in a seeded random order, each to the side whose class
    counts lag their targets most; of ``PLACEMENT_TRIES`` such orders the one
    with the smallest worst relative miss (per class) is kept. Then every
    training message that shares a key with any test message is dropped.
    """
    groups = list(groups) if groups is not None else group_messages(infos)
    members: dict[int, list[int]] = collections.defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    totals = collections.Counter(i.label for i in infos)
    target = {c: totals[c] * (1 - train_fraction) for c in totals}
    rng = random.Random(f"grouped:{seed}")
    best: tuple[float, set[int]] | None = None
    for _ in range(PLACEMENT_TRIES):
        order = sorted(members)
        rng.shuffle(order)
        test_groups, counts = _place(order, members, infos, target)
        miss = max(abs(counts[c] - target[c]) / max(target[c], 1) for c in target)
        if best is None or miss < best[0]:
            best = (miss, test_groups)
    assert best is not None
    test_groups = best[1]
    test_keys = {k for i, info in enumerate(infos) if groups[i] in test_groups for k in info.keys}
    train: dict[str, list[Path]] = {c: [] for c in CLASSES}
    test: dict[str, list[Path]] = {c: [] for c in CLASSES}
    purged: collections.Counter[str] = collections.Counter()
    for i, info in enumerate(infos):
        if groups[i] in test_groups:
            test[info.label].append(info.path)
        elif test_keys.intersection(info.keys):
            purged[info.label] += 1
        else:
            train[info.label].append(info.path)
    names = {info.path.name: f"g{groups[i]}" for i, info in enumerate(infos)}
    return Split("grouped", seed, train, test, dict(purged), names)


def _place(
    order: Iterable[int],
    members: dict[int, list[int]],
    infos: Sequence[MessageInfo],
    target: dict[str, float],
) -> tuple[set[int], collections.Counter[str]]:
    """One greedy placement: a group goes to test while that helps the lagging classes."""
    test_groups: set[int] = set()
    counts: collections.Counter[str] = collections.Counter()
    placed: collections.Counter[str] = collections.Counter()
    total = collections.Counter(infos[i].label for m in members.values() for i in m)
    for g in order:
        size = collections.Counter(infos[i].label for i in members[g])
        # Compare the relative fill of test (to its target) with that of train.
        test_fill = sum((counts[c] + size[c]) / max(target[c], 1) * size[c] for c in size)
        train_fill = sum(
            (placed[c] - counts[c] + size[c]) / max(total[c] - target[c], 1) * size[c] for c in size
        )
        if test_fill <= train_fill:
            test_groups.add(g)
            counts.update(size)
        placed.update(size)
    return test_groups, counts
