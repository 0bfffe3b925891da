"""lorakit combine DIR_A DIR_B --weights 0.7 0.3 --method linear --rank 16 --out DIR (task arithmetic)."""

from __future__ import annotations


def add(sub) -> None:
    c = sub.add_parser("combine", help="combine adapters by weights into a new adapter (task arithmetic)")
    c.add_argument("adapters", nargs="+", help="adapter folders")
    c.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter (negative negates)")
    c.add_argument("--method", default="linear",
                   help="cat (exact) | linear (dense sum, SVD to --rank) | svd | ties | dare_linear | dare_ties")
    c.add_argument("--rank", type=int, help="rank of the result (default: sum of ranks)")
    c.add_argument("--density", type=float, help="kept fraction for ties / dare")
    c.add_argument("--out", required=True, help="output adapter folder")


def run(args) -> int:
    from ..combine import combine_adapter_dirs
    report = combine_adapter_dirs(args.adapters, args.weights, args.method, args.rank, args.out, density=args.density)
    print(report)
    print(f"combined adapter written to {args.out}")
    return 0
