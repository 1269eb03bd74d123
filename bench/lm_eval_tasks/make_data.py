"""Build the two small local lm-eval tasks' data from ../shared/data/alpaca_sample.json (deterministic):
alpaca_mc.jsonl (20 four-way multiple-choice items: an instruction and four answers, one its own) and
alpaca_gen.jsonl (10 instructions with their reference answers, for generate_until).

Usage: python bench/lm_eval_tasks/make_data.py [ALPACA_JSON]   (writes next to this file)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parents[2] / "shared" / "data" / "alpaca_sample.json"


def main(source: Path) -> None:
    records = json.loads(source.read_text())
    short = [r for r in records if not r["input"] and len(r["output"]) < 60 and len(r["instruction"]) < 100]
    if len(short) < 30:
        sys.exit(f"{source}: expected at least 30 short records, found {len(short)}")
    mc = []
    for i, r in enumerate(short[:20]):
        others = [short[(i + k) % len(short)]["output"] for k in (7, 13, 19)]
        gold = i % 4  # the right answer's position rotates, so always picking one slot scores 25%
        choices = others[:gold] + [r["output"]] + others[gold:]
        mc.append({"question": r["instruction"], "choices": choices, "gold": gold})
    gen = [{"question": r["instruction"], "answer": r["output"]} for r in short[20:30]]
    for name, rows in (("alpaca_mc.jsonl", mc), ("alpaca_gen.jsonl", gen)):
        (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
