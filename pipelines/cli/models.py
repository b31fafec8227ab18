"""`pointflow train` and `pointflow models list`"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.common import print_json, settings_from_env


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a custom classifier for an account from labelled LAS/LAZ",
        description=(
            "Learn a per-account classifier from LAS/LAZ files whose classification field holds the "
            "customer's labels (per-point features at several neighbourhood scales: planarity, linearity, "
            "scattering, verticality, height above ground, returns, intensity; gradient-boosted trees). "
            "20 %% of 10 m tiles are held out and scored per class (precision, recall, F1). The model is "
            "stored in the account's area with a version and its evaluation, and can only be applied to "
            "that account's data: 'pointflow classify IN OUT --classifier MODEL_ID --account ID'."
        ),
    )
    train.add_argument("files", nargs="+", type=Path, metavar="LABELLED", help="labelled LAS/LAZ files")
    train.add_argument("--account", required=True, metavar="ID", help="the account that owns the labels and the model")
    train.add_argument("--ignore-class", type=int, action="append", default=None, metavar="N",
                       help="class left out of training and scoring (repeatable; default 0 and 1: never classified, unclassified)")
    train.add_argument("--json", action="store_true", help="print the model and its evaluation as JSON")
    train.set_defaults(handler=_train)

    models = commands.add_parser("models", help="list an account's trained classifiers")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="list trained models", description="List the account's trained models: id, version, evaluation.")
    listing.add_argument("--account", required=True, metavar="ID")
    listing.add_argument("--json", action="store_true", help="print a JSON array ([] when there are none)")
    listing.set_defaults(handler=_list)


def _scores(model) -> str:
    lines = [f"  {'class':>5} {'precision':>9} {'recall':>7} {'F1':>6} {'points':>8}"]
    for cls, m in model.evaluation["per_class"].items():
        lines.append(f"  {cls:>5} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} {int(m['support']):>8,}")
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from pipelines.jobs import Runtime
    from pipelines.training import train_from_sources

    for path in args.files:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    runtime = Runtime.from_settings(settings_from_env().allowing(*args.files))
    ignore = tuple(args.ignore_class) if args.ignore_class else (0, 1)
    model = train_from_sources(runtime, args.account, [str(path) for path in args.files], ignore_classes=ignore)
    if args.json:
        print_json(model.to_public())
        return 0
    print(f"model {model.model_id} (version {model.version}) for account {model.account_id}, stored at {model.key}")
    print(f"held-out evaluation on {model.evaluation['held_out_points']:,} points:")
    print(_scores(model))
    print(f"use it: pointflow classify IN.laz OUT.laz --classifier {model.model_id} --account {model.account_id}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from pipelines.jobs import Runtime
    from pipelines.training import list_models

    models = list_models(Runtime.from_settings(settings_from_env()), args.account)
    if args.json:
        print_json([m.to_public() for m in models])
        return 0
    if not models:
        print(f"account {args.account} has no trained models")
    for m in models:
        f1 = ", ".join(f"{c}: {s['f1']:.3f}" for c, s in m.evaluation["per_class"].items())
        print(f"{m.model_id}  v{m.version}  {m.created_at:%Y-%m-%d %H:%M}  F1 {f1}")
    return 0
