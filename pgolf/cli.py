"""The `pgolf` command: tools around the pipeline that `dvc repro` does not run."""

import argparse
import os
import signal
import sys
from pathlib import Path

from .errors import PgolfError
from . import launch


def compare(args: argparse.Namespace) -> None:
    from . import compare

    table = compare.rows(compare.load_show(args.json))
    print(compare.markdown(table) if args.format == "markdown" else compare.plain(table))


def export(args: argparse.Namespace) -> None:
    from . import export
    from .config import load_params

    script = export.export_run(load_params(args.params), Path(args.out))
    print(f"{args.out}: train_gpt.py ({script.stat().st_size:,} bytes), final_model.blob, submission.json, README.md")


def check(args: argparse.Namespace) -> None:
    from .config import find_key, load_params

    for key in args.key or []:
        find_key(key)
    load_params(args.params)
    print(f"{args.params}: valid" + (f"; {', '.join(args.key)}: params" if args.key else ""))


def mirror(args: argparse.Namespace) -> None:
    from .corpus import write_mirror

    manifest = write_mirror(args.corpus, Path(args.out), args.val_docs, args.shard_tokens, args.tokenizer, args.vocab,
                            case_ops=args.caseops)
    d = manifest["datasets"][0]
    print(f"{args.out}: {d['name']}, {d['stats']['files_train']} train shards ({d['stats']['tokens_train']:,} tokens), "
          f"{d['stats']['files_val']} val ({d['stats']['tokens_val']:,}); data.source: fineweb, "
          f"data.fineweb_variant: {manifest['tokenizers'][0]['name']}, data.fineweb_mirror: {args.out}"
          + (", data.caseops: true" if args.caseops else ""))


def plots(args: argparse.Namespace) -> None:
    from . import compare, io, plots

    show = compare.load_show(args.json)
    with io.atomic_dir(args.out, "plots") as tmp:
        written = plots.write(show, tmp)
    print("\n".join(str(Path(args.out) / p.name) for p in written))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pgolf", description="Parameter Golf as a DVC pipeline: tools beside "
                                     "`dvc repro` (run them in the repository root).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="experiments as a table sorted by bpb, failed ones marked, headroom to the limit")
    p.add_argument("json", nargs="?", help="saved output of `dvc exp show --json` (default: run it here)")
    p.add_argument("--format", choices=("markdown", "plain"), default="markdown")
    p.set_defaults(run=compare)
    p = sub.add_parser("plots", help="PNG plots of the experiments: train loss, val_bpb against total bytes, quant gap")
    p.add_argument("json", nargs="?", help="saved output of `dvc exp show --json` (default: run it here)")
    p.add_argument("--out", default="plots", help="folder to write the PNGs to (default: plots)")
    p.set_defaults(run=plots)
    p = sub.add_parser("export", help="the run's submission folder (train_gpt.py, blob, submission.json, README, logs)")
    p.add_argument("--out", default="artifacts/export", help="folder to write (default: artifacts/export)")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(run=export)
    p = sub.add_parser("check", help="check params.yaml: every key, range and choice")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--key", action="append", help="also check that this dotted key (as given to -S) is a param")
    p.set_defaults(run=check)
    p = sub.add_parser("mirror", help="a local jsonl/txt corpus as a FineWeb mirror (for data.fineweb_mirror, offline)")
    p.add_argument("corpus", nargs="+", help="jsonl, jsonl.zst or txt files, as data.paths")
    p.add_argument("--out", required=True, help="new folder to write the mirror to")
    p.add_argument("--tokenizer", help="a SentencePiece model (default: train a BPE of --vocab on the train docs)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--val-docs", type=int, default=150, help="the first N documents are the val split")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--caseops", action="store_true", help="CaseOps: transform the text, write val_bytes sidecars "
                   "(the record's CaseOps export; --tokenizer the record's model, or one is trained with the operators)")
    p.set_defaults(run=mirror)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, launch.interrupt_once)
    try:
        args.run(args)
        sys.stdout.flush()
    except PgolfError as e:
        sys.exit(f"error: pgolf {args.command}: {e}")
    except BrokenPipeError:  # `pgolf compare | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (KeyboardInterrupt, Exception) as e:
        if not launch.caused_by_interrupt(e):
            raise
        launch.ignore_signals()
        sys.exit(f"error: pgolf {args.command}: interrupted")


if __name__ == "__main__":
    main()
