"""Reading stored mail: mbox split in chunks, Maildir, hostile files reported and skipped."""

from __future__ import annotations

import io
import os
from pathlib import Path

from gateway.mailsource import (
    Item,
    Problem,
    Source,
    label_of,
    looks_like_mail,
    mbox_spans,
    read_file_item,
    walk,
)


def mbox(*bodies: bytes) -> bytes:
    return b"".join(b"From sender@b.test Mon Jan  1 00:00:00 2024\n" + b + b"\n" for b in bodies)


def test_mbox_spans_are_the_same_whatever_the_chunk_size() -> None:
    data = mbox(b"Subject: one\n\nbody\n>From quoted\n", b"Subject: two\n\nx\n", b"Subject: 3\n\n")
    expected = list(mbox_spans(io.BytesIO(data)))
    assert len(expected) == 3
    for chunk in (1, 2, 5, 6, 7, 13, 64):
        assert list(mbox_spans(io.BytesIO(data), chunk=chunk)) == expected


def test_mbox_messages_come_back_without_from_line_or_separator(tmp_path: Path) -> None:
    path = tmp_path / "box"
    path.write_bytes(mbox(b"Subject: one\n\nbody\n>From quoted\n", b"Subject: two\n\nx\n"))
    found = list(walk([Source(str(path), "spam")], limit=10_000))
    assert [i.name for i in found] == [f"{path}#1", f"{path}#2"]
    first = found[0]
    assert isinstance(first, Item) and first.label == "spam"
    assert read_file_item(first) == b"Subject: one\n\nbody\n>From quoted\n"


def test_an_oversized_message_in_an_mbox_is_reported_and_the_rest_read(tmp_path: Path) -> None:
    path = tmp_path / "big.mbox"
    path.write_bytes(
        mbox(b"Subject: small\n\nx\n", b"Subject: big\n\n" + b"y" * 50_000, b"S: z\n\n")
    )
    found = list(walk([Source(str(path))], limit=10_000))
    assert [type(i) for i in found] == [Item, Problem, Item]
    assert isinstance(found[1], Problem) and "over server.max_message_size" in found[1].reason


def test_maildir_reads_cur_and_new_not_tmp_and_skips_what_is_not_mail(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
        (md / sub / f"1.{sub}").write_bytes(b"Subject: " + sub.encode() + b"\n\nx\n")
    (md / ".Sent" / "cur").mkdir(parents=True)  # a Maildir++ folder: hidden, not walked
    (md / ".Sent" / "cur" / "1").write_bytes(b"Subject: sent\n\nx\n")
    (md / "cur" / "broken").symlink_to(tmp_path / "nowhere")
    (md / "new" / "empty").write_bytes(b"")
    os.mkfifo(md / "new" / "pipe")
    found = list(walk([Source(str(md))], limit=10_000))
    items = [i.name for i in found if isinstance(i, Item)]
    assert items == [str(md / "cur" / "1.cur"), str(md / "new" / "1.new")]
    problems = {Path(p.name).name: p.reason for p in found if isinstance(p, Problem)}
    assert problems["broken"].startswith("cannot read")
    assert problems["empty"] == "empty file"
    assert problems["pipe"] == "not a regular file"


def test_labels_and_mail_detection() -> None:
    assert label_of("/x/spam") == "spam" and label_of("/x/ham/") == "ham"
    assert label_of("/x/Spam.mbox") == "spam" and label_of("/x/inbox") == ""
    assert looks_like_mail(b"Return-Path: <a@b>\r\n") and looks_like_mail(b"From a@b x\n")
    assert not looks_like_mail(b"\x89PNG\r\n") and not looks_like_mail(b"hello world\n")
