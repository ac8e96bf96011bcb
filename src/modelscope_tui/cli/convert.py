"""`mscope convert SRC DST`: a checkpoint's model tensors as Hugging Face safetensors
(write/convert.py does the work; this module parses, reports and renders)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="any checkpoint mscope reads (.pt/.bin, legacy, DCP directory, sharded set, safetensors, GGUF)",
    )
    p.add_argument(
        "dest",
        help="a directory (model.safetensors, or shards + model.safetensors.index.json) or a .safetensors file",
    )
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="bytes per shard in a directory: 5GB (10**9 bytes each, the default), 2GiB, ...",
    )
    p.add_argument(
        "--dtype",
        metavar="DTYPE",
        help="cast floating-point tensors (only those) to bf16, fp16 or fp32",
    )
    p.add_argument(
        "--strip-prefix",
        metavar="PREFIX",
        help="remove PREFIX from the names that start with it (e.g. app.model.)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="diff the result against the source (bit-exact unless --dtype); exit 1 when it differs",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing output files (kept as .bak) and convert a file whose pickle names dangerous globals",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from ..readers import open_checkpoint
    from ..units import fmt_bytes, safe_text
    from ..write.convert import convert, verify_convert
    from .common import EXIT_OK, progress_bar, warning

    max_shard = None
    if args.max_shard_size is not None:
        from ..training.devicemap import parse_size

        max_shard = parse_size(args.max_shard_size)
        if max_shard <= 0:
            from ..errors import MscopeError

            raise MscopeError(
                f"invalid shard size {args.max_shard_size!r}", hint="like 5GB or 2GiB"
            )
    ckpt = open_checkpoint(args.source)
    with progress_bar("convert") as progress:
        result = convert(
            ckpt,
            args.dest,
            dtype=args.dtype,
            strip_prefix=args.strip_prefix,
            max_shard_size=max_shard,
            overwrite=args.force,
            allow_dangerous=args.force,
            progress=progress,
        )
    plan = result.plan
    shards = len(plan.shards)
    where = safe_text(str(result.opened))
    print(
        f"wrote {plan.tensor_count:,} tensors, {fmt_bytes(plan.total_bytes)} in {shards} file{'s' if shards != 1 else ''} "
        f"({where}) in {result.seconds:.1f} s"
    )
    if plan.cast_count:
        print(
            f"cast {plan.cast_count:,} floating-point tensor(s) to {plan.dtype}; other dtypes are unchanged"
        )
    if plan.tied:
        print(
            f"{len(plan.tied):,} tied tensor(s) written once; aliases in __metadata__['mscope.tied']"
        )
    if args.force and not str(args.dest).endswith(".safetensors"):
        stale = stale_shards(result.files)
        if stale:
            warning(
                f"{len(stale)} older shard(s) not in the new index were left as they were, e.g. "
                f"{safe_text(stale[0])}"
            )
    if plan.dropped:
        warning(
            f"only the model's tensors were converted; left out: {', '.join(safe_text(s) for s in plan.dropped[:5])}"
        )
    if not args.verify:
        return EXIT_OK
    with progress_bar("verify") as progress:
        check = verify_convert(ckpt, result, progress=progress)
    if check.ok:
        exact = "within the cast's rounding" if plan.dtype else "bit-exact"
        print(f"verified: {len(check.report.tensors):,} tensors match the source ({exact})")
        return EXIT_OK
    for line in check.failures[:10]:
        print(f"mismatch: {safe_text(line)}", file=sys.stderr)
    more = len(check.failures) - 10
    print(
        f"verify failed: {len(check.failures):,} tensor(s) differ{f' ({more:,} not listed)' if more > 0 else ''}",
        file=sys.stderr,
    )
    return 1


def stale_shards(files: list) -> list[str]:
    """Shards of an earlier set in the same directory that the new index does not name
    (--force replaces files by name only; removing others is the user's call)."""
    written = {f.name for f in files}
    folder = files[0].parent
    return sorted(
        p.name
        for p in folder.glob("model*.safetensors")
        if p.name not in written and folder.is_dir() and p.name != "model.safetensors.bak"
    )
