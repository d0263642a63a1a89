"""The `mergelib` command: `merge CONFIG OUT [options]` and `methods`. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import re
import sys

from mergelib.errors import MergelibError

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(|b|[kmgt]b?|[kmgt]ib)$")
_SCALE = {"": 1, "b": 1000**3, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str) -> int:
    """Bytes from `5GB`, `500MB`, `2GiB`, a plain number, or `5B` (as in mergekit: 5 billion bytes)."""
    match = _SIZE.match(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (examples: 5GB, 500MB, 1GiB)")
    number, unit = match.groups()
    if unit.endswith("ib"):
        scale = 1024 ** ("kmgt".index(unit[0]) + 1)
    else:
        scale = _SCALE[unit if unit == "b" else unit[:1]]
    return int(float(number) * scale)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mergelib", description="Merge fine-tuned LLM checkpoints from mergekit-style recipes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    m = sub.add_parser("merge", help="merge the models of a recipe (mergekit YAML) into OUT")
    m.add_argument("config", help="recipe YAML (mergekit format)")
    m.add_argument("out", help="output directory (replaced atomically on success)")
    m.add_argument("--seed", type=int, default=0, help="seed for randomized methods (default 0)")
    m.add_argument("--out-shard-size", type=parse_size, default=parse_size("5GB"), help="max bytes per shard (5GB)")
    m.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="output dtype (overrides out_dtype)")
    m.add_argument("--threads", type=int, default=None, help="tensors merged in parallel (default 2)")
    m.add_argument("--memory-budget", type=parse_size, default=None, help="working-memory cap (default: half of free RAM)")
    m.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base (or first) model's tokenizer files (default on)")
    m.add_argument("--allow-crimes", action="store_true", help="allow inputs of different architectures")
    m.add_argument("--trust-remote-code", action="store_true", help="allow inputs whose config needs custom code")
    m.add_argument("--allow-nan", action="store_true", help="merge inputs that hold NaN/Inf values")
    m.add_argument("--dry-run", action="store_true", help="print the plan (tensors, bytes, memory) and stop")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("methods", help="list the merge methods with their parameters, defaults and papers")
    return parser


def _param_lines(model) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        label = field.alias or name
        default = "required" if field.is_required() else f"default {field.default!r}"
        out.append(f"{label} ({default})")
    return out


def cmd_methods() -> int:
    from mergelib.methods import REGISTRY

    for spec in REGISTRY.values():
        base = {"required": "base required", "optional": "base optional", "input": "base is an input",
                "none": "no base"}[spec.base]
        print(f"{spec.name}: {spec.summary}")
        print(f"  {base}; paper: {spec.paper or '-'}")
        print(f"  global: {', '.join(_param_lines(spec.params)) or '-'}")
        print(f"  per model: {', '.join(_param_lines(spec.model_params)) or '-'}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from mergelib.api import merge

    result = merge(
        args.config, args.out, seed=args.seed, out_shard_size=args.out_shard_size, threads=args.threads,
        copy_tokenizer=args.copy_tokenizer, allow_crimes=args.allow_crimes,
        trust_remote_code=args.trust_remote_code, quiet=args.quiet, dry_run=args.dry_run, dtype=args.dtype,
        memory_budget=args.memory_budget, allow_nan=args.allow_nan,
    )
    plan = result.plan
    threads = args.threads or 2
    if args.dry_run:
        print(f"plan: {plan.method.name}, {len(plan.models)} models, {len(plan.jobs)} tensors in {len(plan.shards)} shard(s)")
        for job in plan.jobs:
            who = ("base + " if job.base else "") + f"{len(job.sources)} model(s)"
            print(f"  {job.name}  {list(job.shape)} {str(job.dtype).removeprefix('torch.')}  <- {who}")
        for note in plan.notes:
            print(f"note: {note}")
        print(f"read {_human(plan.bytes_read)}, write {_human(plan.bytes_written)}, "
              f"estimated peak memory {_human(plan.peak_memory(threads))} ({threads} threads)")
        return 0
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    resumed = f" ({result.shards_reused} complete shard(s) reused from an interrupted run)" if result.shards_reused else ""
    print(f"merged {result.n_tensors} tensors ({_human(result.bytes_written)}) into {result.out_dir} "
          f"in {result.seconds:.1f}s, peak RSS {_human(result.peak_rss_bytes)}{resumed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            return cmd_methods()
        return cmd_merge(args)
    except MergelibError as exc:
        print(f"mergelib: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mergelib: interrupted; the previous output (if any) is untouched", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
