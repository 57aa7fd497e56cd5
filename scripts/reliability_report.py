"""Render the reliability ledger of a test run as docs/reliability.md.

The ledger is written by tests/reliability/conftest.py when ``TZK_RELIABILITY_RECORD`` is set::

    TZK_RELIABILITY_RECORD=reliability.json pytest tests/reliability --slow
    python scripts/reliability_report.py reliability.json > docs/reliability.md

Each row is one fault or bad input on one command: how many times it was tried, what tzk did
(with the exit codes seen and one example message), and what was lost.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

INTRO = """# Reliability: faults and bad input, tried and counted

Users point tzk at files they did not make, run it for days on shared machines that die, and
chain it in pipelines that must stop on the first error. This page lists every fault and bad
input that the reliability tests (`tests/reliability/`) inject, how many times, what tzk did,
and what was lost. The goal is nothing, and a loss in any try fails the test. The table is
generated from a real test run by `scripts/reliability_report.py` (see the end of the page).

Exit codes: 0 success, 2 usage, 3 bad input, 4 busy, 5 the run failed (disk full, a failed
write, divergence), 130 interrupted; `-9` is a process killed by SIGKILL, which cannot be
caught: what matters then is what it left on disk.
"""

METHOD = """## How the faults are made

- **SIGKILL** (`test_kill.py`): each command runs once uninterrupted; its result is the
  reference and its duration the range of the kill moments. Kills alternate between a seeded
  moment in that range and a seeded 0-50 ms after the command's temporary artifact (`.tmp-`
  store, checkpoint or image) appears, that is inside the write. After each kill: the store is
  the old one byte for byte or the complete new one (digest recomputed); every checkpoint
  verifies against its `integrity.json` and `run.json` names one on disk; a run's files are
  byte for byte what they were; an image or extension that a killed process finished is
  complete and verifies; and the next command runs to the end (a resumed training ends with
  weights bit-identical to an uninterrupted run). A kill that lands after the
  command finished is counted as "finished first" (exit 0).
- **Disk full** (`test_disk.py`): the store or run on a real tmpfs mounted with a small
  `size=`, or filled to the last page; **read-only**: a read-only bind mount; `chattr +i`.
- **Hostile files** (`test_hostile.py`): truncation at seeded lengths and single bit flips at
  seeded offsets of real stores, checkpoint files and manifests; a checkpoint whose weights and
  state pickle a call to `open(marker, "w")`, with every sha256 forged to match (the marker
  must not exist afterwards); stores declaring 10^9 images they never stored, sides of 10^6,
  float images, int64 codes, numeric vocabularies; names with `/`, `..`, control characters.
- **HDF5 library crash**: `open_store` probe-opens every file in a forked child first; the
  test makes that child die by a real SIGSEGV and checks that the caller gets one error line
  and carries on.
- **Property-based** (`test_properties.py`, Hypothesis): condition specs, `--class`,
  `--prior`, the store reader with any key or attribute replaced by arbitrary data, and TOML
  configuration files built from arbitrary keys and values.
- **Concurrency** (`test_concurrency.py`): a real second process on the same store or run;
  **exit codes** (`test_exit_codes.py`): every command with an unknown flag, a missing input,
  a held lock, and valid input.
"""


LIMITS = """## Known limits

- A disk that another process fills *during* an ingest's HDF5 write (after its free-space
  check) still fails the write with the no-space line and leaves the old store intact, but
  the HDF5 library may then crash the process at exit (its file handle is left broken).
- The HDF5 probe reads the metadata, the first and last image and the chunk index; a crash
  that only a read of other image chunks would cause still happens in the caller.
- SIGTERM before `tzk train` reaches its loop (while loading) ends it with the default action
  (-15) rather than 130; nothing has been written by then. SIGTERM of other commands is the
  default action too; SIGINT (Ctrl-C) is 130 everywhere.
- A killed `tzk sample` or `tzk eval`, or a `tzk train` killed while it rewrote `run.json`
  or `config.toml`, may leave a `.tmp-` file beside that file which the next run does not
  remove (litter, not loss); stores and checkpoints clean theirs up.
- Locks are `flock` locks: advisory, and unreliable on some network file systems.
- `tzk extend` and `tzk sample` with the same run and seed did not always give the same
  bytes: in a long test session against a fresh process, and once between two fresh
  processes (PYTHONHASHSEED, the global RNG and the thread count were ruled out; the cause is
  not known). The kill tests therefore check that a finished output is complete, not that it
  equals a reference.
"""


def cell(text: str) -> str:
    text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/", ".../", str(text))  # test folders
    return text.replace("|", "\\|").replace("\n", " ")


def counted(counter: dict[str, int]) -> str:
    if len(counter) == 1:
        return next(iter(counter))
    return "; ".join(f"{key} ({count})" for key, count in counter.items())


def codes(counter: dict[str, int]) -> str:
    return ", ".join(f"{code} ×{count}" if count > 1 else code
                     for code, count in sorted(counter.items(), key=lambda kv: int(kv[0])))


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| fault or bad input | command | tries | what tzk did | exit codes | lost |",
             "| --- | --- | ---: | --- | --- | --- |"]
    for row in rows:
        did = counted(row["did"])
        if row["example"]:
            did += f"; e.g. `{row['example']}`"
        lines.append(f"| {cell(row['fault'])} | {cell(row['command'])} | {row['tries']} | "
                     f"{cell(did)} | {codes(row['codes']) or '-'} | "
                     f"{cell(counted(row['lost']))} |")
    return lines


def render(document: dict[str, Any]) -> str:
    rows = document["rows"]
    tries = sum(row["tries"] for row in rows)
    lost = sum(count for row in rows for what, count in row["lost"].items()
               if what != "nothing")
    machine = document["machine"]
    outcomes = document["outcomes"]
    lines = [INTRO, "## The table", "",
             f"{len(rows)} faults and bad inputs, {tries} tries; lost in any of them: "
             f"{'nothing' if lost == 0 else f'{lost} tries lost something'}.", ""]
    lines += table(rows)
    lines += ["", "## Covered by other tests", "",
              "These faults are tried by the tests of each layer; they are not repeated here.",
              "", "| fault or bad input | command | tests |", "| --- | --- | --- |"]
    lines += [f"| {cell(e['fault'])} | {e['command']} | `{cell(e['tests'])}` |"
              for e in document["elsewhere"]]
    lines += ["", METHOD, LIMITS, "## This run", "",
              f"Produced on {document['date']} by "
              f"`TZK_RELIABILITY_RECORD=FILE pytest tests/reliability"
              f"{' --slow' if document['slow'] else ''}` in {document['seconds'] / 60:.1f} "
              f"minutes: {outcomes.get('passed', 0)} tests passed, "
              f"{outcomes.get('failed', 0)} failed, {outcomes.get('skipped', 0)} skipped.",
              f"Machine: {machine['platform']}, {machine['cpus']} CPUs (shared with other "
              f"work), Python {machine['python']}, torch {machine['torch']}, h5py "
              f"{machine['h5py']} (HDF5 {machine['hdf5']}).", "",
              "Regenerate it with:", "", "```bash",
              "TZK_RELIABILITY_RECORD=reliability.json pytest tests/reliability --slow",
              "python scripts/reliability_report.py reliability.json > docs/reliability.md",
              "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("record", type=Path, help="the JSON ledger of a test run")
    args = parser.parse_args(argv)
    document = json.loads(args.record.read_text(encoding="utf-8"))
    sys.stdout.write(render(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
