"""`medclip pretrain --config RECIPE [--set key=value ...] [--resume latest|PATH | --overwrite]`."""

from __future__ import annotations

from medclip.training import rehearsal  # light at import: the parser needs its arguments


def run(args, callbacks=(), checkpoint_writer=None) -> int:
    """``callbacks`` and ``checkpoint_writer``: handed to the trainer (``Pretrainer.from_recipe``)."""
    from medclip.training.api import pretrain
    from medclip.training.config import load_recipe

    if args.rehearse:
        return rehearsal.run_from_args(args)
    recipe = load_recipe(args.config, args.set + (["data.allow_pipe=true"] if args.allow_pipe else []))
    if args.print_recipe:
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    pretrain(recipe, resume=args.resume, overwrite=args.overwrite, callbacks=callbacks,
             checkpoint_writer=checkpoint_writer)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", help="pretrain a dual encoder from a YAML recipe")
    parser.add_argument("--config", required=True,
                        help="a shipped recipe's name (demo, shared_real...; `medclip list recipes`) or a recipe YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", default=None, help="'latest' (newest checkpoint in output_dir) or a path")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output_dir that holds another run: its checkpoints, log.jsonl, "
                             "export, eval and report are removed first")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--allow-pipe", action="store_true",
                        help="let the data manifests run their pipe: shell commands (= --set data.allow_pipe=true)")
    rehearsal.add_arguments(parser)
    parser.set_defaults(func=run)
