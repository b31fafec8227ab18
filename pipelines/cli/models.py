"""`pointflow train`, `pointflow models list`, `pointflow models delete`, `pointflow models build-shared` and
`pointflow models re-sign`"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.common import CommandError, print_deletion, print_json, settings_from_env


def class_code(text: str) -> int:
    """An argparse type: a LAS class code, 0 to 255 (what the training DAG's ignore_classes takes)."""
    try:
        code = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a class code: give a number from 0 to 255") from None
    if not 0 <= code <= 255:
        raise argparse.ArgumentTypeError(f"{code} is not a LAS class code: they run from 0 to 255")
    return code


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a custom classifier for an account from labelled LAS/LAZ",
        description=(
            "Learn a per-account classifier, in the customer's own class codes, from LAS/LAZ files whose "
            "classification field holds the customer's labels (LightGBM on what the standard classifier "
            "knows: height above its ground model, its own classes and their surroundings, planarity and "
            "other shapes at several neighbourhood scales, returns, intensity). 25 % of the 20 m blocks "
            "are held out and scored per class (precision, recall, F1) for the model and for standard on "
            "the same points, with the model's held-out points counted by label and by the class it gave "
            "(which labels it takes for which class: what to label more of). The model is stored in the account's area with a version and its evaluation "
            "only if its macro F1 (over the classes with at least 100 held-out points) beats standard's "
            "(otherwise the figures are printed, nothing is stored and "
            "the exit code is 1), and can only be applied to that account's data: "
            "'pointflow classify IN OUT --classifier MODEL_ID --account ID'."
        ),
    )
    train.add_argument("files", nargs="+", type=Path, metavar="LABELLED", help="labelled LAS/LAZ files")
    train.add_argument("--account", required=True, metavar="ID", help="the account that owns the labels and the model")
    train.add_argument(
        "--ignore-class",
        type=class_code,
        action="append",
        default=None,
        metavar="N",
        help="class left out of training and scoring (repeatable; default 0 and 1: never classified, unclassified)",
    )
    train.add_argument("--json", action="store_true", help="print the model and its evaluation as JSON")
    train.set_defaults(handler=_train)

    models = commands.add_parser(
        "models", help="list, delete or build the shared model of trained classifiers (list, delete, build-shared)"
    )
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = sub.add_parser(
        "list",
        help="list trained models",
        description=(
            "List the account's trained models: id, version, date, the standard classifier's version it was "
            "trained and judged against ('unknown' for models stored before it was recorded; after standard "
            "changes the model still classifies, but its 'better than standard' verdict was against that "
            "version: retrain to re-check), held-out F1 per class."
        ),
    )
    listing.add_argument("--account", required=True, metavar="ID", help="the account whose models to list")
    listing.add_argument(
        "--deleted",
        action="store_true",
        help="also list deleted models (id, version, when it was deleted), as the manifests of jobs that used them name them",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array ([] when there are none)")
    listing.set_defaults(handler=_list)
    removal = sub.add_parser(
        "delete",
        help="delete one trained model",
        description=(
            "Delete one of the account's trained models on the customer's request: its signed model file and "
            "its evaluation, every stored version of both, with an entry in the deletion audit "
            "('pointflow lifecycle audit'). Refused while the account is on legal hold or while a job not yet "
            "finished classifies with the model. The model's id and version stay in the catalog as deleted: "
            "its version number is never given out again, and the manifests of the jobs that used it still "
            "name it. The account's other models, and its jobs' results, are not touched."
        ),
    )
    removal.add_argument("model_id", metavar="MODEL_ID", help="the model's id, as 'pointflow models list' prints it")
    removal.add_argument("--account", required=True, metavar="ID", help="the account that owns the model")
    removal.add_argument("--json", action="store_true", help="print the deletion's audit entry as JSON")
    removal.set_defaults(handler=_delete)
    shared = sub.add_parser(
        "build-shared",
        help="train a candidate shared model from consenting accounts' labels",
        description=(
            "Train a model for the shared standard classifiers from labelled files of several accounts. "
            "Every account must be on the professional_sharing plan (the customers who consent to it): "
            "one that is not refuses the whole build, before any file is read. The model and the list of "
            "contributions are stored under service/models/."
        ),
    )
    shared.add_argument(
        "--from",
        dest="contributions",
        action="append",
        required=True,
        metavar="ACCOUNT=FILE",
        help="a labelled LAS/LAZ file and the account it belongs to (repeatable)",
    )
    shared.add_argument(
        "--ignore-class",
        type=class_code,
        action="append",
        default=None,
        metavar="N",
        help="class left out of training and scoring (repeatable; default 0 and 1)",
    )
    shared.add_argument("--json", action="store_true", help="print the stored record as JSON")
    shared.set_defaults(handler=_build_shared)
    resign = sub.add_parser(
        "re-sign",
        help="re-sign models stored before their signature bound their account (once, after upgrading)",
        description=(
            "Model files are signed (POINTFLOW_MODEL_KEY) over their bytes, the account that owns them and their "
            "id, so a model moved to another account is refused. Files stored by earlier releases were signed "
            "over their bytes alone and are refused with a message naming this command. It checks each such file "
            "against its old signature, where its account keeps it and the sha256 the catalog recorded, then "
            "signs it again for the account and id the catalog gives it (trusting the catalog this once, as every "
            "load did before); shared models are bound to their id. Run it once after upgrading, before training "
            "or classifying with custom models again. Files already re-signed are left alone; a file that fails a "
            "check is left as it was and listed (exit code 1): retrain that model."
        ),
    )
    resign.add_argument("--json", action="store_true", help="print the models re-signed and those refused as JSON")
    resign.set_defaults(handler=_reseal)


def _scores(evaluation: dict) -> str:
    from pipelines.training import held_out_rows

    rows = held_out_rows(evaluation)
    lines = [f"  {'class':>5} {'points':>8}   {'F1':>6} {'precision':>9} {'recall':>7}   {'standard F1':>11}"]
    for row in rows:
        lines.append(
            f"  {row['class']:>5} {row['points']:>8,}   {row['f1']:>6.3f} {row['precision']:>9.3f} {row['recall']:>7.3f}   "
            f"{row['standard_f1']:>11.3f}" + ("" if row["judged"] else "   (too few points to judge)")
        )
    small = [row["class"] for row in rows if not row["judged"]]
    lines.append(
        f"  macro F1: {evaluation['macro_f1']:.3f}, standard's {evaluation['standard_macro_f1']:.3f}"
        + (
            f" ({'class' if len(small) == 1 else 'classes'} {', '.join(small)} left out: fewer than "
            f"{evaluation['min_judged_points']} points)"
            if small
            else ""
        )
    )
    return "\n".join(lines)


def _confusion(evaluation: dict) -> str:
    """The model's held-out points by label (rows) and by the class it gave (columns); empty for
    models stored before the confusion was recorded."""
    table = evaluation.get("confusion")
    if not table or not any(map(sum, table["custom"])):
        return ""
    codes, counts = table["classes"], table["custom"]
    # The classes of the labels or of the model's answers: a class only standard gave has no column.
    shown = [k for k, row in enumerate(counts) if sum(row) or any(other[k] for other in counts)]
    width = max(8, *(len(f"{n:,}") + 1 for row in counts for n in row))
    lines = ["held-out points by label (rows) and the model's class (columns):"]
    lines.append(f"  {'label':>5}" + "".join(f"{codes[k]:>{width}}" for k in shown))
    for i in shown:
        if sum(counts[i]):
            lines.append(f"  {codes[i]:>5}" + "".join(f"{counts[i][k]:>{width},}" for k in shown))
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from pipelines.cli.progress import ProgressBars
    from pipelines.runtime import Runtime
    from pipelines.training import NotBetterThanStandard, train_from_sources

    for path in args.files:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    runtime = Runtime.from_settings(settings_from_env().allowing(*args.files))
    ignore = tuple(args.ignore_class) if args.ignore_class else (0, 1)
    try:
        with ProgressBars() as progress:
            model = train_from_sources(
                runtime, args.account, [str(path) for path in args.files], ignore_classes=ignore, progress=progress
            )
    except NotBetterThanStandard as refused:
        if args.json:
            print_json({"offered": False, "account_id": args.account, "evaluation": refused.evaluation})
        else:
            print(f"held-out evaluation on {refused.evaluation['held_out_points']:,} points:")
            print(_scores(refused.evaluation))
            if table := _confusion(refused.evaluation):
                print(table)
            print(f"not better than standard: no model stored for account {args.account}; keep using standard")
        return 1
    if args.json:
        print_json(model.to_public())
        return 0
    print(f"model {model.model_id} (version {model.version}) for account {model.account_id}, stored at {model.key}")
    print(f"judged against standard {model.standard_version}")
    print(f"held-out evaluation on {model.evaluation['held_out_points']:,} points:")
    print(_scores(model.evaluation))
    if table := _confusion(model.evaluation):
        print(table)
    print(f"use it: pointflow classify IN.laz OUT.laz --classifier {model.model_id} --account {model.account_id}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from pipelines.runtime import Runtime
    from pipelines.training import list_models

    models = list_models(Runtime.from_settings(settings_from_env()), args.account, include_deleted=args.deleted)
    if args.json:
        print_json([m.to_public() for m in models])
        return 0
    if not models:
        print(f"account {args.account} has no trained models")
    for m in models:
        if m.deleted_at is not None:
            print(f"{m.model_id}  v{m.version}  {m.created_at:%Y-%m-%d %H:%M}  deleted {m.deleted_at:%Y-%m-%d %H:%M}")
            continue
        f1 = ", ".join(f"{c}: {s['f1']:.3f}" for c, s in m.evaluation["per_class"].items())
        verdict = f"; macro {m.evaluation['macro_f1']:.3f}, standard's {m.evaluation['standard_macro_f1']:.3f}"
        print(
            f"{m.model_id}  v{m.version}  {m.created_at:%Y-%m-%d %H:%M}  standard {m.standard_version}  F1 {f1}{verdict}"
        )
    return 0


def _delete(args: argparse.Namespace) -> int:
    from pipelines.runtime import Runtime
    from pipelines.training import delete_model

    audit = delete_model(Runtime.from_settings(settings_from_env()), args.account, args.model_id)
    print_deletion(audit, args.json, f"deleted {args.model_id} of account {args.account}")
    return 0


def _build_shared(args: argparse.Namespace) -> int:
    from pipelines.cli.progress import ProgressBars
    from pipelines.runtime import Runtime
    from pipelines.training import build_shared_model

    contributions: dict[str, list[str]] = {}
    for item in args.contributions:
        account, sep, path = item.partition("=")
        if not sep or not account or not path:
            raise CommandError(f"--from {item!r}: give ACCOUNT=FILE")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such file: {path}")
        contributions.setdefault(account, []).append(path)
    runtime = Runtime.from_settings(
        settings_from_env().allowing(*(Path(p) for ps in contributions.values() for p in ps))
    )
    ignore = tuple(args.ignore_class) if args.ignore_class else (0, 1)
    with ProgressBars() as progress:
        record = build_shared_model(runtime, contributions, ignore_classes=ignore, progress=progress)
    if args.json:
        print_json(record)
        return 0
    accounts = sorted({c["account_id"] for c in record["contributions"]})
    print(
        f"shared model {record['model_id']} from {len(record['contributions'])} file(s) of {', '.join(accounts)}, stored at {record['key']}"
    )
    print(_scores(record["evaluation"]))
    return 0


def _reseal(args: argparse.Namespace) -> int:
    from pipelines.runtime import Runtime
    from pipelines.training import reseal_models

    report = reseal_models(Runtime.from_settings(settings_from_env()))
    if args.json:
        print_json({"resealed": report.resealed, "refused": report.refused})
    else:
        print(f"re-signed {len(report.resealed)} model(s){': ' if report.resealed else ''}{', '.join(report.resealed)}")
        for why in report.refused.values():
            print(f"not re-signed: {why}")
    return 1 if report.refused else 0
