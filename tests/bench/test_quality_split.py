"""bench.quality's splits: grouped splits share no sender, list or near-duplicate; time splits
train on the older mail. Small synthetic corpora, no shared corpus needed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.quality_split import (
    CLASSES,
    arrival_time,
    group_messages,
    grouped_split,
    jaccard,
    list_key,
    load_infos,
    near_duplicate_pairs,
    random_split,
    sender_key,
    shingles,
    time_split,
)

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]


def _body(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n))


def _message(sender: str, body: str, *, list_id: str = "", day: int = 1) -> bytes:
    head = [
        f"From: Someone <{sender}>",
        "To: user@example.org",
        f"Subject: note {day}",
        f"Received: from relay.example.net by mx.example.org; {day:02d} Sep 2002 10:00:00 +0000",
        f"Date: {day:02d} Sep 2002 09:59:00 +0000",
    ]
    if list_id:
        head.append(f"List-Id: The list <{list_id}>")
    return ("\r\n".join(head) + "\r\n\r\n" + body + "\r\n").encode()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Per class a dozen senders, some on lists, one spam campaign sent five times."""
    rng = random.Random(7)
    for label in CLASSES:
        (tmp_path / label).mkdir()
    n = 0

    def put(label: str, data: bytes) -> None:
        nonlocal n
        n += 1
        (tmp_path / label / f"{n:05d}.eml").write_bytes(data)

    campaign = _body(rng, 80)
    for k in range(5):  # near-duplicates from different senders: one campaign
        put("spam", _message(f"x{k}@spammer{k}.example", campaign + f" id{k}", day=1 + k))
    for k in range(30):
        put("spam", _message(f"s{k}@sp{k % 12}.example", _body(rng), day=1 + k % 28))
    for k in range(60):
        lst = f"list{k % 4}.example.org" if k % 3 == 0 else ""
        put("ham", _message(f"h{k}@org{k % 15}.example", _body(rng), list_id=lst, day=1 + k % 28))
    for k in range(12):
        put("hard-ham", _message(f"news@shop{k % 5}.example", _body(rng), day=1 + k % 28))
    # a poster on a list who also writes directly: the purge must handle it
    put("ham", _message("h0@org0.example", _body(rng), list_id="list1.example.org", day=3))
    return tmp_path


def test_sender_keys_are_domains_except_for_mailbox_providers_and_anonymised_addresses() -> None:
    assert sender_key("Ann <ann@mail.shop.example.co.uk>") == "domain:example.co.uk"
    assert sender_key("bob@Hotmail.com") == "address:bob@hotmail.com"
    assert sender_key("boingboing <rssfeeds@spamassassin.taint.org>") == (
        "address:rssfeeds@spamassassin.taint.org|boingboing"
    )
    assert sender_key("") == ""
    assert sender_key("undisclosed") == "address:undisclosed"


def test_list_keys_take_the_identifier_in_angle_brackets() -> None:
    assert list_key("Friends of Rohit <fork.xent.com>") == "list:fork.xent.com"
    assert list_key("bare.example.org") == "list:bare.example.org"
    assert list_key("") == ""


def test_near_duplicate_bodies_share_most_shingles() -> None:
    rng = random.Random(1)
    text = _body(rng, 100)
    assert jaccard(shingles(text), shingles(text + " and a new line of text")) > 0.8
    assert jaccard(shingles(text), shingles(_body(rng, 100))) < 0.1
    assert shingles("") == frozenset()
    assert len(shingles("two words")) == 1


def test_arrival_is_the_topmost_received_stamp_then_date() -> None:
    import email

    msg = email.message_from_bytes(
        b"Received: by b; Tue, 03 Sep 2002 10:00:00 +0000\r\n"
        b"Received: by a; Mon, 02 Sep 2002 10:00:00 +0000\r\n"
        b"Date: Sun, 01 Sep 2002 10:00:00 +0000\r\n\r\nx"
    )
    assert arrival_time(msg) == 1031047200.0  # 2002-09-03T10:00Z, not the older stamps
    assert arrival_time(email.message_from_bytes(b"Date: Sun, 01 Sep 2002 10:00:00 +0000\r\n\r\nx"))
    assert arrival_time(email.message_from_bytes(b"Date: yesterday\r\n\r\nx")) == 0.0


def test_a_campaign_is_found_and_grouped(corpus: Path) -> None:
    infos = load_infos(corpus)
    pairs = near_duplicate_pairs(infos)
    campaign = {i for i, info in enumerate(infos) if info.sender.startswith("domain:spammer")}
    assert len(campaign) == 5
    assert {i for pair in pairs for i in pair} == campaign
    groups = group_messages(infos)
    assert len({groups[i] for i in campaign}) == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_grouped_split_shares_no_sender_list_or_campaign(corpus: Path, seed: int) -> None:
    infos = load_infos(corpus)
    by_path = {info.path: info for info in infos}
    split = grouped_split(infos, seed, 0.5)
    train = [by_path[p] for c in CLASSES for p in split.train[c]]
    test = [by_path[p] for c in CLASSES for p in split.test[c]]
    assert not {k for i in train for k in i.keys} & {k for i in test for k in i.keys}
    assert not any(jaccard(a.shingles, b.shingles) >= 0.5 for a in train for b in test)
    # every message is tested, trained or purged, once
    counted = len(train) + len(test) + sum(split.purged.values())
    assert counted == len(infos)
    assert len(set(train) | set(test)) == len(train) + len(test)
    for label in CLASSES:  # each class roughly halved
        n = sum(1 for i in infos if i.label == label)
        assert abs(len(split.test[label]) - n / 2) <= max(3, n * 0.2), (label, split.test)


def test_grouped_splits_differ_by_seed_and_repeat_for_one(corpus: Path) -> None:
    infos = load_infos(corpus)
    one, again, other = (grouped_split(infos, s, 0.5) for s in (1, 1, 2))
    assert one.test == again.test
    assert one.test != other.test


def test_time_split_trains_on_the_older_mail(corpus: Path) -> None:
    infos = load_infos(corpus)
    by_path = {info.path: info for info in infos}
    split = time_split(infos, 0.5)
    for label in CLASSES:
        newest_trained = max(by_path[p].arrival for p in split.train[label])
        oldest_tested = min(by_path[p].arrival for p in split.test[label])
        assert newest_trained <= oldest_tested
        assert abs(len(split.train[label]) - len(split.test[label])) <= 1


def test_random_split_is_the_benchmarks_original_per_class_shuffle(corpus: Path) -> None:
    infos = load_infos(corpus)
    split = random_split(infos, 5, 0.5)
    for label in CLASSES:
        files = sorted((corpus / label).iterdir())
        random.Random(f"5:{label}").shuffle(files)
        cut = round(len(files) * 0.5)
        assert split.train[label] == files[:cut]
        assert split.test[label] == files[cut:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["grouped", "time", "random"])
def test_bench_quality_runs_each_split_end_to_end(corpus: Path, tmp_path: Path, kind: str) -> None:
    """`python -m bench.quality --split KIND` over a small corpus: counts and intervals add up."""
    import json
    import subprocess
    import sys
    import tarfile

    archive = tmp_path / "mini.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for label in CLASSES:
            tar.add(corpus / label, arcname=label)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench.quality", "--corpus", str(archive), "--split", kind),
            *("--no-bayes", "--json", "--dump", str(tmp_path / "dump.jsonl")),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["split"] == kind
    rows = [json.loads(line) for line in (tmp_path / "dump.jsonl").read_text().splitlines()]
    for label in CLASSES:
        cls = report["classes"][label]
        n = sum(1 for p in (corpus / label).iterdir())
        assert cls["trained"] + cls["purged"] + cls["tested"] == n
        tested = [r for r in rows if r["class"] == label]
        assert len(tested) == cls["tested"]
        assert cls["flagged"] == sum(r["flagged"] for r in tested)
        low, high = cls["ci95"]["wilson"]
        assert low <= cls["flagged_rate"] <= high
    assert {r["split"] for r in rows} == {kind}


@pytest.mark.parametrize("kind", ["grouped", "time", "random"])
def test_the_development_split_lies_inside_the_training_half(corpus: Path, kind: str) -> None:
    """--develop tunes on the training half only: the outer test half is never in it."""
    from bench.quality import development_split, make_split

    infos = load_infos(corpus)
    outer = make_split(kind, infos, 1, 0.5, group_messages(infos))
    inner = development_split(kind, infos, outer, 1, 0.5)
    names = {c: {p.name for p in outer.train[c]} for c in CLASSES}
    tested = {p.name for c in CLASSES for p in outer.test[c]}
    for c in CLASSES:
        inside = {p.name for p in inner.train[c] + inner.test[c]}
        assert inside <= names[c] and not inside & tested
        assert inner.test[c], c
    assert inner.kind.startswith(kind) and "development" in inner.kind
