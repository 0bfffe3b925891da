"""Generate the lorakit demo dataset: date normalisation to ISO 8601.

Each example is a date written the way people write it ("Fri, March 5th, 2021",
"5 Mar 2021", "the 5th of March, 2021", ...) and the answer is the ISO form
"2021-03-05" and nothing else.  The base model answers with a sentence, the
wrong order, or a wrong month number; a small LoRA adapter learns the exact
format.

Deterministic (seeded, stdlib only).  Run from anywhere:

    python examples/demo/make_data.py

writes examples/demo/train.jsonl and examples/demo/eval.jsonl next to this
file.  Eval dates are disjoint from train dates (as calendar dates, not just
as strings).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

PROMPT = "Convert to YYYY-MM-DD: {date}"

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
MONTHS_ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun",
               "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
            "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Each style renders a datetime.date as free text.  No purely numeric styles:
# "05/03/2021" is ambiguous (US vs. European order), so every style names the
# month.
STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",             # March 5, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",              # 5 March 2021
    lambda d: f"{MONTHS_ABBR[d.month - 1]} {d.day}, {d.year}",        # Mar 5, 2021
    lambda d: f"{d.day} {MONTHS_ABBR[d.month - 1]} {d.year}",         # 5 Mar 2021
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",    # March 5th, 2021
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",  # the 5th of March, 2021
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",  # Friday, March 5, 2021
    lambda d: f"{d.year}, {MONTHS[d.month - 1]} {d.day}",             # 2021, March 5
]


def random_date(rng: random.Random) -> dt.date:
    start = dt.date(1950, 1, 1).toordinal()
    end = dt.date(2049, 12, 31).toordinal()
    return dt.date.fromordinal(rng.randint(start, end))


def make(n_train: int, n_eval: int, seed: int):
    rng = random.Random(seed)
    seen: set[dt.date] = set()
    rows = []
    while len(rows) < n_train + n_eval:
        d = random_date(rng)
        if d in seen:
            continue
        seen.add(d)
        # Round-robin over styles so every style is equally represented in
        # both splits; shuffle afterwards.
        style = STYLES[len(rows) % len(STYLES)]
        rows.append({"prompt": PROMPT.format(date=style(d)),
                     "completion": d.isoformat()})
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-eval", type=int, default=80)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=here)
    args = ap.parse_args()
    train, evl = make(args.n_train, args.n_eval, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evl)):
        with open(args.out / name, "w", encoding="utf-8", newline="\n") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {args.out / name}")


if __name__ == "__main__":
    main()
