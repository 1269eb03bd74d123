"""Compare lm-evaluation-harness sample logs (`--log_samples`) of two runs of the same tasks, e.g. the `hf`
backend and `local-completions` against `gpt2 serve` on the same exported folder: per-choice log-likelihoods
(loglikelihood tasks) must agree to --tol, and is_greedy must agree; generations (generate_until) are
counted equal or not. Prints a table and exits 1 when a log-likelihood differs by more than --tol.

Usage: python bench/lm_eval_compare.py REFERENCE_DIR OTHER_DIR [--tol 1e-3]   (stdlib only)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def samples(out_dir: Path) -> dict[str, dict[int, dict]]:
    """task -> doc_id -> sample, from the newest samples_<task>_*.jsonl of each task under `out_dir`."""
    newest: dict[str, Path] = {}
    for path in sorted(out_dir.rglob("samples_*.jsonl"), key=lambda p: p.stat().st_mtime):
        newest[path.name[len("samples_"):].rsplit("_", 1)[0]] = path
    if not newest:
        sys.exit(f"{out_dir}: no samples_*.jsonl (run lm_eval with --log_samples --output_path {out_dir})")
    return {task: {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}
            for task, path in newest.items()}


def loglikelihoods(sample: dict) -> list[tuple[float, bool]]:
    """Per choice (log-likelihood, is_greedy): `resps` holds one [ll, is_greedy] list per request."""
    return [(float(r[0][0]), str(r[0][1]) == "True") for r in sample["resps"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path, help="--output_path of the reference run (e.g. the hf backend)")
    ap.add_argument("other", type=Path, help="--output_path of the run to check (e.g. local-completions)")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest allowed |log-likelihood difference|")
    args = ap.parse_args()
    ref, other = samples(args.reference), samples(args.other)
    failed = False
    for task in sorted(set(ref) & set(other)):
        docs = sorted(set(ref[task]) & set(other[task]))
        a, b = [ref[task][d] for d in docs], [other[task][d] for d in docs]
        if a and isinstance(a[0]["resps"][0][0], list):  # loglikelihood: [[ll, is_greedy]] per choice
            pairs = [(x, y) for sa, sb in zip(a, b) for x, y in zip(loglikelihoods(sa), loglikelihoods(sb))]
            diff = max(abs(x[0] - y[0]) for x, y in pairs)
            greedy_same = sum(x[1] == y[1] for x, y in pairs)
            ok = diff <= args.tol
            failed |= not ok
            print(f"{task}: {len(docs)} docs, {len(pairs)} choices, max |ll difference| {diff:.2e} "
                  f"({'<=' if ok else '>'} {args.tol:g}), is_greedy equal {greedy_same}/{len(pairs)}, "
                  f"first choices' ll {[round(x[0], 4) for x, _ in pairs[:3]]} vs "
                  f"{[round(y[0], 4) for _, y in pairs[:3]]}")
        else:
            same = sum(sa["resps"] == sb["resps"] for sa, sb in zip(a, b))
            print(f"{task}: {len(docs)} docs, generations equal {same}/{len(docs)}, "
                  f"first: {a[0]['resps'][0]!r} vs {b[0]['resps'][0]!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
