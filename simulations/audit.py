"""``flower-pae audit``: what an honest-but-curious server can learn from a run.

    flower-pae audit RUN_DIR [MORE_RUN_DIRS ...] --out DIR

The first run directory is audited in full (label inference, partition and content leakage);
further ones (the same run with other ``target_noise`` settings) add the privacy/accuracy
trade-off. Runs must have been made with ``record_wire=true`` and the cohort secret exported
(``FLOWER_PAE_COHORT_SECRET``), which the evaluator needs to score the attacks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pool_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"pool sizes must be integers: {text!r}") from err
    if not sizes or sizes[0] < 2:
        raise argparse.ArgumentTypeError(f"pool sizes must be ≥ 2, got {text!r}")
    return sizes


def cmd_audit(args: argparse.Namespace) -> int:
    from flower_pae.privacy.report import run_audit

    out = Path(args.out)
    result = run_audit(
        args.run_dirs,
        out,
        content_samples=args.content_samples,
        pool_sizes=args.pool_sizes,
        content=not args.no_content,
        seed=args.seed,
    )
    overall = result["runs"][0]["overall"]
    print(json.dumps({k: round(v, 4) for k, v in overall.items()}, indent=2))
    print(f"report: {(out / 'report.md').resolve()}")
    return 0


def add_audit_command(sub: argparse._SubParsersAction) -> None:
    """Register ``audit`` on the ``flower-pae`` parser's subcommands."""
    audit = sub.add_parser(
        "audit",
        help="privacy audit of the server's view of runs (needs record_wire=true)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    audit.add_argument("--out", required=True, help="report directory")
    audit.add_argument(
        "--content-samples",
        type=int,
        default=50,
        help="cached samples per task attacked for content (default 50)",
    )
    audit.add_argument(
        "--pool-sizes",
        type=_pool_sizes,
        default=[10, 100],
        help="candidate pool sizes, comma-separated (default 10,100)",
    )
    audit.add_argument("--no-content", action="store_true", help="skip the content attack")
    audit.add_argument("--seed", type=int, default=0, help="seed of the attacks (default 0)")
    audit.set_defaults(func=cmd_audit)
