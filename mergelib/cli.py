"""The `mergelib` command: `merge CONFIG OUT`, `moe CONFIG OUT`, `extract-lora`, `methods`, `warm-kernels`.
Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from mergelib.errors import MergelibError

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(|b|[kmgt]b?|[kmgt]ib)$")
_SCALE = {"": 1, "b": 1000**3, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


@contextmanager
def imports_without_gc():
    """Import the heavy modules (torch, numba) with the cyclic garbage collector off, then freeze what they made.

    Importing torch allocates enough objects to trigger many full collections, and every later full collection
    would scan them all again; frozen, they are never scanned. Measured on the tiny-family merge: about 0.8 s of
    CPU less (benchmarks/startup_bench.py). Collection resumes for the merge itself (unless it was off before)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


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
    size = int(float(number) * scale)
    if size < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is {size} bytes; give a size of at least 1 byte (e.g. 5GB)")
    return size


def positive_int(text: str) -> int:
    """An integer of at least 1 (thread counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}': give at least 1")
    return value


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergelib")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """`--version`, looked up only when asked (importlib.metadata costs tens of ms on every command otherwise)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"mergelib {_version()}")
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mergelib", description="Merge fine-tuned LLM checkpoints from mergekit-style recipes.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    m = sub.add_parser("merge", help="merge the models of a recipe (mergekit YAML) into OUT")
    m.add_argument("config", help="recipe YAML (mergekit format)")
    m.add_argument("out", help="output directory (replaced atomically on success)")
    m.add_argument("--seed", type=int, default=0, help="seed for randomized methods (default 0)")
    m.add_argument("--out-shard-size", type=parse_size, default=parse_size("5GB"), help="max bytes per shard (5GB)")
    m.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="output dtype (overrides out_dtype)")
    m.add_argument("--threads", type=positive_int, default=None, help="tensors merged in parallel (default: the cores available)")
    m.add_argument("--memory-budget", type=parse_size, default=None, help="working-memory cap (default: half of free RAM)")
    m.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base (or first) model's tokenizer files (default on)")
    m.add_argument("--allow-crimes", action="store_true", help="allow inputs of different architectures")
    m.add_argument("--trust-remote-code", action="store_true", help="allow inputs whose config needs custom code")
    m.add_argument("--allow-nan", action="store_true", help="merge inputs that hold NaN/Inf values")
    m.add_argument("--unsafe-truncate-embeddings", action="store_true",
                   help="merge embeddings of different vocabulary sizes by keeping their first rows (no tokenizer: "
                        "block); without it that is an error, as in mergekit 0.1.5")
    m.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="ray: each output shard a Ray task (local Ray, or RAY_ADDRESS); the same bytes as local")
    m.add_argument("--workers", type=positive_int, default=None,
                   help="shard tasks at once on a local Ray (default: the cores; --threads each, default 1)")
    m.add_argument("--device", default="cpu",
                   help="cpu (numba kernels), cuda or cuda:N: where the merge math runs (elementwise methods give "
                        "the same bytes on any device; see `mergelib methods`)")
    m.add_argument("--cuda", dest="device", action="store_const", const="cuda", help="mergekit's flag: --device cuda")
    m.add_argument("--read-to-gpu", action="store_true", help="move inputs to the GPU as stored, widen them there")
    m.add_argument("--multi-gpu", action="store_true", help="spread output tensors over every GPU of this machine")
    m.add_argument("--dry-run", action="store_true", help="print the plan (tensors, bytes, memory) and stop")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--intermediate-dir", "-I", default=None,
                   help="multi-document recipes: where named stages are written (default OUT.intermediate)")
    sub.add_parser("methods", help="list the merge methods with their parameters, defaults and papers")
    sub.add_parser("warm-kernels", help="compile the numba kernels into their on-disk cache (run once after "
                                        "installing; `make install` does), so no merge compiles")
    _add_moe(sub)
    _add_extract_lora(sub)
    _add_search(sub)
    _add_tokensurgeon(sub)
    return parser


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="search a recipe's parameters on validation prompts (Optuna; resumable)")
    p.add_argument("config", help="YAML with `recipe:` (a mergekit recipe or its path) and `search:` "
                                  "(conf/search/demo.yaml's schema)")
    p.add_argument("--out", default="outputs/search", help="where best.yml goes (default outputs/search)")
    p.add_argument("--reports", default="reports/search", help="report, plots, trials (default reports/search)")
    p.add_argument("--seed", type=int, default=0, help="merge seed of randomized methods (default 0)")
    p.add_argument("--trials", type=positive_int, default=None, help="override search.trials")
    p.add_argument("--executor", choices=("serial", "ray"), default=None, help="override search.executor")
    p.add_argument("--workers", type=positive_int, default=None, help="override search.workers (ray)")
    p.add_argument("--storage", default=None, help="override search.storage (an RDB URL)")


# tokensurgeon's choices, spelled here so building the parser does not import torch; a test guards drift from
# mergelib.tokenizer.approximate and mergelib.tokenizer.transplant
TOKENSURGEON_METHODS = ("omp", "common_interpolation", "subword", "mean", "zero", "randn")
TOKENSURGEON_WEIGHT_SCHEMES = ("distance_proportional", "barycentric", "least_squares")
TOKENSURGEON_SUBWORD_METHODS = ("mean", "sum", "weighted_mean", "first_last")
TOKENSURGEON_MATCH_SCOPES = ("no", "yes", "embed", "lm_head")


def _add_tokensurgeon(sub) -> None:
    p = sub.add_parser("tokensurgeon", help="give MODEL the DONOR's tokenizer (new embedding rows approximated)")
    p.add_argument("model", help="the model whose weights are kept (directory or Hub id)")
    p.add_argument("donor", help="the model whose tokenizer the output gets")
    p.add_argument("out", help="output directory (replaced atomically on success)")
    p.add_argument("--approximation-method", "-a", choices=TOKENSURGEON_METHODS, default="omp",
                   help="how rows of tokens MODEL lacks are built (default omp)")
    p.add_argument("-k", type=int, default=64, help="anchors (shared tokens) per new token for omp and "
                                                    "common_interpolation (default 64)")
    p.add_argument("--cosine-similarity", "-c", action="store_true",
                   help="pick anchors by cosine similarity instead of dot product (omp) or L2 distance")
    p.add_argument("--weight-scheme", "-w", choices=TOKENSURGEON_WEIGHT_SCHEMES, default="distance_proportional",
                   help="common_interpolation weights (default distance_proportional)")
    p.add_argument("--subword-method", "-s", choices=TOKENSURGEON_SUBWORD_METHODS, default="mean",
                   help="subword: how the pieces' rows combine (default mean)")
    p.add_argument("--batch-size", type=int, default=512, help="new tokens approximated at once (default 512)")
    p.add_argument("--prefix-match", "-pm", nargs="?", const="yes", default="no", choices=TOKENSURGEON_MATCH_SCOPES,
                   help="copy the row of MODEL's longest token that is a byte prefix of a new token")
    p.add_argument("--byte-match", "-bm", nargs="?", const="yes", default="no", choices=TOKENSURGEON_MATCH_SCOPES,
                   help="copy the row of MODEL's token with the same bytes under another spelling")
    p.add_argument("--new-vocab-noise", "-nvn", type=float, default=0.0, help="std of noise added to new rows")
    p.add_argument("--new-vocab-scale", "-nvs", type=float, default=1.0, help="new rows are multiplied by this")
    p.add_argument("--seed", type=int, default=0, help="seed for randn and --new-vocab-noise (default 0)")
    p.add_argument("--out-shard-size", type=parse_size, default=parse_size("5GB"), help="max bytes per shard (5GB)")


def _add_moe(sub) -> None:
    p = sub.add_parser("moe", help="build a sparse mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) from dense models")
    p.add_argument("config", help="MoE config YAML (mergekit-moe format)")
    p.add_argument("out", help="output directory (replaced atomically on success)")
    p.add_argument("--seed", type=int, default=0, help="seed for random gates and expert noise (default 0)")
    p.add_argument("--out-shard-size", type=parse_size, default=parse_size("5GB"), help="max bytes per shard (5GB)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass for gate_mode hidden (16)")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base model's tokenizer files (default on)")
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same", action="store_true",
                   help="allow every expert to be the same model")


def _add_extract_lora(sub) -> None:
    p = sub.add_parser("extract-lora", help="extract a PEFT LoRA adapter from a fine-tune's difference to its base")
    p.add_argument("--model", required=True, help="the fine-tuned model (directory or Hub id)")
    p.add_argument("--base", "--base-model", dest="base", required=True, help="the model it was fine-tuned from")
    p.add_argument("--out", "--out-path", dest="out", required=True, help="adapter output directory")
    p.add_argument("--max-rank", type=int, default=128, help="largest LoRA rank per module (default 128)")
    p.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="drop singular values <= this (default 0: keep every non-zero one up to --max-rank)")
    p.add_argument("--include-regex", "-i", action="append", default=[], metavar="RE",
                   help="only modules whose name matches (repeatable)")
    p.add_argument("--exclude-regex", "-e", action="append", default=[], metavar="RE",
                   help="skip modules whose name matches (repeatable)")
    p.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="split the singular values as sqrt(S) into both factors (default on)")
    p.add_argument("--embed-lora", action="store_true", help="LoRA on embeddings instead of storing them whole")
    p.add_argument("--skip-undecomposable", action="store_true",
                   help="skip changed modules a LoRA cannot hold (norms) instead of storing them whole")


def _param_lines(model, ignored: dict[str, str]) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        label = field.alias or name
        if field.exclude:  # set by the engine (a pre-pass), not by recipes
            continue
        if label in ignored:
            out.append(f"{label} (accepted for mergekit recipes, ignored)")
            continue
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
        print(f"  global: {', '.join(_param_lines(spec.params, dict(spec.ignored))) or '-'}")
        print(f"  per model: {', '.join(_param_lines(spec.model_params, dict(spec.ignored))) or '-'}")
        if spec.statistics is not None:
            flow = " through the merged layers below" if spec.statistics_flow == "merged" else ""
            print(f"  needs calibration: {spec.statistics} statistics{flow} (recipe block `calibration:`)")
        print("  on a GPU: " + ("the same bytes as the CPU" if spec.device_exact else
                                "within 1e-6 relative of the CPU (reductions run in the device's order)"))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    with imports_without_gc():
        from mergelib.config.recipe import load_recipes
        from mergelib.merging.api import default_threads, estimated_peak_rss, merge

    recipes = load_recipes(Path(args.config))  # the argument is always a file, whatever its name
    if len(recipes) > 1:
        return cmd_multi(args, recipes)
    result = merge(
        recipes[0], args.out, seed=args.seed, out_shard_size=args.out_shard_size, threads=args.threads,
        copy_tokenizer=args.copy_tokenizer, allow_crimes=args.allow_crimes,
        trust_remote_code=args.trust_remote_code, quiet=args.quiet, dry_run=args.dry_run, dtype=args.dtype,
        memory_budget=args.memory_budget, allow_nan=args.allow_nan,
        unsafe_truncate_embeddings=args.unsafe_truncate_embeddings, executor=args.executor, workers=args.workers,
        device=args.device, read_to_gpu=args.read_to_gpu, multi_gpu=args.multi_gpu,
    )
    plan = result.plan
    threads = args.threads or default_threads()
    for line in plan.ignored_warnings():
        print(f"mergelib: warning: {line}", file=sys.stderr)
    for line in plan.dequantised_notes():
        print(f"mergelib: note: {line}", file=sys.stderr)
    if args.dry_run:
        print(f"plan: {plan.method.name}, {len(plan.models)} models, {len(plan.jobs)} tensors in {len(plan.shards)} shard(s)")
        for job in plan.jobs:
            who = ("base + " if job.base else "") + f"{len(job.sources)} model(s)"
            print(f"  {job.name}  {list(job.shape)} {str(job.dtype).removeprefix('torch.')}  <- {who}")
        for note in plan.notes:
            print(f"note: {note}")
        for model, name, why in plan.left_out:
            print(f"left out: {model}: {name} ({why})")
        print(f"read {_human(plan.bytes_read)}, write {_human(plan.bytes_written)}, "
              f"estimated peak memory {_human(estimated_peak_rss(plan, threads))} ({threads} threads; merge work "
              f"{_human(plan.peak_memory(threads))}, the rest is this process and its compiled kernels)")
        return 0
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if plan.statistics is not None:
        reused = sum(plan.statistics.reused.values())
        print(f"mergelib: note: {plan.statistics.kind} statistics: {reused} of {len(plan.models)} model(s) from the "
              f"cache or given files, {len(plan.models) - reused} gathered", file=sys.stderr)
    resumed = f" ({result.shards_reused} complete shard(s) reused from an interrupted run)" if result.shards_reused else ""
    print(f"merged {result.n_tensors} tensors ({_human(result.bytes_written)}) into {result.out_dir} "
          f"in {result.seconds:.1f}s, peak RSS {_human(result.peak_rss_bytes)}{resumed}")
    return 0


def cmd_multi(args: argparse.Namespace, recipes) -> int:
    from mergelib.merging.multi import merge_multi

    result = merge_multi(
        recipes, args.out, intermediate_dir=args.intermediate_dir, seed=args.seed, dry_run=args.dry_run,
        out_shard_size=args.out_shard_size, threads=args.threads, copy_tokenizer=args.copy_tokenizer,
        allow_crimes=args.allow_crimes, trust_remote_code=args.trust_remote_code, quiet=args.quiet,
        dtype=args.dtype, memory_budget=args.memory_budget, allow_nan=args.allow_nan,
        unsafe_truncate_embeddings=args.unsafe_truncate_embeddings, executor=args.executor, workers=args.workers,
        device=args.device, read_to_gpu=args.read_to_gpu, multi_gpu=args.multi_gpu,
    )
    for run in result.stages:
        label = run.name or "(final)"
        if run.reused:
            state = "unchanged, reused"
        elif run.result is None:
            state = "would run (after the stages it uses)"
        elif args.dry_run:
            state = f"would merge {run.result.n_tensors} tensors"
        else:
            state = f"merged {run.result.n_tensors} tensors in {run.result.seconds:.1f}s"
        print(f"stage {label}: {state} -> {run.out_dir}")
    return 0


def cmd_moe(args: argparse.Namespace) -> int:
    with imports_without_gc():
        from mergelib.moe.build import build_moe

    result = build_moe(args.config, args.out, seed=args.seed, out_shard_size=args.out_shard_size,
                       batch_size=args.batch_size, allow_all_same=args.allow_all_same,
                       copy_tokenizer=args.copy_tokenizer)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"built a {result.architecture} with {result.n_experts} experts: {result.n_tensors} tensors "
          f"({_human(result.bytes_written)}) in {result.out_dir} in {result.seconds:.1f}s")
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from mergelib.lora.extract import extract_lora

    result = extract_lora(args.model, args.base, args.out, max_rank=args.max_rank, sv_epsilon=args.sv_epsilon,
                          include=args.include_regex, exclude=args.exclude_regex,
                          distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
                          skip_undecomposable=args.skip_undecomposable)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    worst = max(result.errors.values(), default=0.0)
    print(f"extracted {len(result.ranks)} LoRA modules (rank <= {max(result.ranks.values(), default=0)}, worst "
          f"relative error {worst:.3g}) and {len(result.saved_modules)} whole modules into {result.out_dir}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from mergelib.pipeline.tracking import stage_run
    from mergelib.search.config import load_search_file, validate_search
    from mergelib.search.run import run_search

    recipe, search = load_search_file(args.config)
    overrides = {k: v for k, v in (("trials", args.trials), ("executor", args.executor), ("workers", args.workers),
                                   ("storage", args.storage)) if v is not None}
    if overrides:
        search = validate_search({**search.model_dump(), **overrides}, "command line")
    with stage_run("search", {"recipe": recipe, "search": search.model_dump(mode="json")}) as run:
        outcome = run_search(recipe, search, out_dir=args.out, reports_dir=args.reports,
                             family=Path(args.config).stem, seed=args.seed, tracker=run)
    top = outcome.best[0]
    held = ", ".join(f"{t} {v:.3f}" for t, v in sorted(top["heldout"].items()))
    print(f"search: study '{outcome.study}': {outcome.counts['complete']} complete, {outcome.counts['pruned']} "
          f"pruned, {outcome.counts['failed']} failed now; best trial {top['number']} -> {outcome.paths['best']} "
          f"(held-out {held})")
    return 0


def cmd_tokensurgeon(args: argparse.Namespace) -> int:
    from mergelib.tokenizer.transplant import TransplantOptions, transplant_tokenizer

    opts = TransplantOptions(
        approximation_method=args.approximation_method, k=args.k, cosine_similarity=args.cosine_similarity,
        weight_scheme=args.weight_scheme, subword_method=args.subword_method, batch_size=args.batch_size,
        prefix_match=args.prefix_match, byte_match=args.byte_match, new_vocab_noise=args.new_vocab_noise,
        new_vocab_scale=args.new_vocab_scale, seed=args.seed, out_shard_size=args.out_shard_size)
    result = transplant_tokenizer(args.model, args.donor, args.out, opts)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    made = ", ".join(f"{name} {n}" for name, n in result.n_approximated.items())
    print(f"transplanted the donor's tokenizer: {result.n_rows} rows, {result.n_shared} shared, approximated "
          f"({result.method}): {made}; into {result.out_dir} in {result.seconds:.1f}s")
    return 0


def cmd_warm_kernels(args: argparse.Namespace) -> int:
    import time

    from mergelib.methods.kernel_warmup import warm_kernels

    start = time.perf_counter()
    total, compiled = warm_kernels()
    print(f"numba kernels: {total} signatures ready, {compiled} compiled now and cached "
          f"({time.perf_counter() - start:.1f}s)")
    return 0


COMMANDS = {"merge": cmd_merge, "warm-kernels": cmd_warm_kernels, "moe": cmd_moe, "extract-lora": cmd_extract_lora, "search": cmd_search,
            "tokensurgeon": cmd_tokensurgeon}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            return cmd_methods()
        return COMMANDS[args.command](args)
    except MergelibError as exc:
        print(f"mergelib: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mergelib: interrupted; the previous output (if any) is untouched", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mergelib methods | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
