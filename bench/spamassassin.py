"""SpamAssassin on bench.quality's splits: the reference point for issue 17's targets.

    apt-get install spamassassin                      # Debian's 4.0 with its rules
    python -m bench.spamassassin --split grouped      # seed 1, as bench.quality
    python -m bench.spamassassin --split time --json

The same corpus, the same split (``bench.quality.make_split``: same files on
each side), and the same conditions as ``bench.quality``: the classifier
(Bayes) learns the training half (``sa-learn``; hard ham learned as ham),
every test message is scored once, and network tests are off
(``local_tests_only``: no DNSBL, URIBL, Razor, Pyzor, SPF or DKIM lookups,
as ``bench.quality``'s resolver answers NXDOMAIN). SpamAssassin's own
default threshold (5.0) decides "flagged", as ``add_header`` does here.
Auto-learn, TxRep and the auto-whitelist are off, so test messages teach
nothing. One Perl process scores every test message (the library, not a
``spamassassin`` process per message).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.quality import DEFAULT_CORPUS, DEVELOP_MIN_LEARNED, crlf, development_split, make_split
from bench.quality_split import CLASSES, SPLITS, group_messages, load_infos
from bench.quality_stats import wilson

THRESHOLD = 5.0  # SpamAssassin's required_score default

PREFS = """\
use_bayes 1
bayes_auto_learn 0
use_auto_whitelist 0
use_txrep 0
required_score 5.0
dns_available no
skip_rbl_checks 1
"""

# Loads SpamAssassin once and prints "file<TAB>score<TAB>tests" per message.
CHECKER = r"""
use strict; use warnings;
use Mail::SpamAssassin;
my ($prefs, $state, @files) = @ARGV;
my $sa = Mail::SpamAssassin->new({
    userprefs_filename => $prefs, userstate_dir => $state,
    local_tests_only => 1, dont_copy_prefs => 1,
});
$sa->init(1);
for my $f (@files) {
    open(my $fh, '<', $f) or die "$f: $!";
    local $/; my $raw = <$fh>; close $fh;
    my $msg = $sa->parse($raw);
    my $status = $sa->check($msg);
    printf "%s\t%.2f\t%s\n", $f, $status->get_score(), $status->get_names_of_tests_hit();
    $status->finish(); $msg->finish();
}
"""


def available() -> str | None:
    """Why SpamAssassin cannot run here, or None."""
    for tool in ("sa-learn", "perl"):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install spamassassin"
    return None


def learn(label: str, files: list[Path], work: Path, prefs: Path, dbpath: Path) -> float:
    folder = work / f"train-{label}"
    folder.mkdir()
    for f in files:
        (folder / f.name).write_bytes(crlf(f.read_bytes()))
    started = time.perf_counter()
    subprocess.run(
        ["sa-learn", "--local", "--prefspath", str(prefs), "--dbpath", str(dbpath),
         f"--{label}", str(folder)],
        check=True, capture_output=True, timeout=1800,
    )  # fmt: skip
    return time.perf_counter() - started


def score(files: list[Path], work: Path, prefs: Path) -> dict[str, tuple[float, str]]:
    """file name -> (score, tests hit), one Perl process for all of them."""
    script = work / "check.pl"
    script.write_text(CHECKER, encoding="utf-8")
    proc = subprocess.run(
        ["perl", str(script), str(prefs), str(work / "state"), *map(str, files)],
        check=True, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    out: dict[str, tuple[float, str]] = {}
    for line in proc.stdout.splitlines():
        path, value, tests = [*line.split("\t"), ""][:3]
        out[Path(path).name] = (float(value), tests)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.spamassassin", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--split", choices=SPLITS, default="random")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument(
        "--develop", action="store_true", help="bench.quality's development split (the same files)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dump", type=Path, help="one JSON line per test message")
    args = parser.parse_args(argv)
    missing = available()
    if missing:
        parser.error(missing)
    with tempfile.TemporaryDirectory(prefix="sa-bench-") as tmp:
        work = Path(tmp)
        with tarfile.open(args.corpus) as tar:
            tar.extractall(work / "corpus", filter="data")
        infos = load_infos(work / "corpus")
        split = make_split(args.split, infos, args.seed, args.train_fraction, group_messages(infos))
        prefs_text = PREFS
        if args.develop:  # as bench.quality --develop: a quarter of the corpus to learn from
            split = development_split(args.split, infos, split, args.seed, args.train_fraction)
            n = DEVELOP_MIN_LEARNED
            prefs_text += f"bayes_min_spam_num {n}\nbayes_min_ham_num {n}\n"
        prefs = work / "user_prefs"
        dbpath = work / "state" / "bayes"
        dbpath.parent.mkdir()
        prefs.write_text(prefs_text + f"bayes_path {dbpath}\n", encoding="utf-8")
        pairs = split.as_pairs()
        seconds = {
            "spam": learn("spam", pairs["spam"][0], work, prefs, dbpath),
            "ham": learn("ham", pairs["ham"][0] + pairs["hard-ham"][0], work, prefs, dbpath),
        }
        tested = [f for c in CLASSES for f in pairs[c][1]]
        started = time.perf_counter()
        scores = score(tested, work, prefs)
        seconds["score"] = time.perf_counter() - started
    classes: dict[str, dict[str, Any]] = {}
    rows = []
    for cls in CLASSES:
        flagged = 0
        for f in pairs[cls][1]:
            value, tests = scores[f.name]
            flagged += value >= THRESHOLD
            rows.append({"class": cls, "file": f.name, "score": value, "tests": tests})
        n = len(pairs[cls][1])
        low, high = wilson(flagged, n)
        classes[cls] = {"tested": n, "flagged": flagged, "rate": flagged / n if n else 0.0,
                        "ci95": [round(low, 5), round(high, 5)]}  # fmt: skip
    if args.dump:
        args.dump.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = {"split": split.kind, "seed": split.seed, "classes": classes, "seconds": seconds}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"SpamAssassin (Bayes, local tests only), split {split.kind}, seed {split.seed}")
    for cls, c in classes.items():
        low, high = c["ci95"]
        print(f"  {cls:9} {c['flagged']:4}/{c['tested']:<5} {100 * c['rate']:6.2f}%"
              f"  (95% CI {100 * low:.1f}-{100 * high:.1f}%)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
