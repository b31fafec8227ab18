"""`pointflow classify INPUT OUTPUT`"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.common import CommandError, print_json, settings_from_env
from pipelines.cli.progress import ProgressBars


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "classify",
        help="classify a local LAS/LAZ file point by point",
        description=(
            "Read INPUT (LAS or LAZ, recognised by content), classify every point into ASPRS classes "
            "(2 ground, 3/4/5 low/medium/high vegetation, 6 building, 7/18 noise, 9 water, 1 other) in "
            "parallel tiles on Dask, and write OUTPUT: .laz compressed, .las plain, or .copc.laz, a cloud-optimized "
            "point cloud (COPC 1.0) that web viewers, QGIS and PDAL stream by region and level of detail. Every "
            "input point is written exactly once; the order may differ. Nothing is written if anything fails."
        ),
    )
    parser.add_argument("input", type=Path, help="LAS/LAZ file to classify")
    parser.add_argument("output", type=Path, help="file to write: .laz, .las or .copc.laz")
    parser.add_argument(
        "--classifier",
        default="standard",
        help="standard (all classes, default), ground (2 vs 1), or a trained model id (needs --account)",
    )
    parser.add_argument(
        "--account",
        default=None,
        metavar="ID",
        help="the account whose data this is: required to apply its trained models",
    )
    parser.add_argument(
        "--tile-size",
        type=float,
        default=None,
        metavar="M",
        help="tile edge in metres; 0 = one tile (default: POINTFLOW_TILE_SIZE or 200)",
    )
    parser.add_argument(
        "--buffer",
        type=float,
        default=None,
        metavar="M",
        help="context ring around each tile in metres (default: POINTFLOW_TILE_BUFFER or 20)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tiles the local Dask cluster classifies at once, one per worker thread, two threads per process (default: POINTFLOW_WORKERS or the number of cores)",
    )
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.set_defaults(handler=_classify)


def _classify(args: argparse.Namespace) -> int:
    from pipelines.classifiers import BUILTIN_CLASSIFIERS
    from pipelines.classify import classify_file
    from pipelines.sources import check_source
    from pipelines.steps.record import held_out_scores
    from pipelines.storage import open_store
    from pipelines.tile import MIN_TILE_POINTS

    if not args.input.is_file():
        raise FileNotFoundError(f"no such file: {args.input}")
    if args.workers is not None and args.workers < 1:
        raise CommandError("--workers must be at least 1")
    settings = settings_from_env().allowing(args.input)
    # Never the service's own files, nor an account's stored objects unless --account owns them.
    check_source(settings, open_store(settings.storage_url), args.account, str(args.input))
    classifier = args.classifier
    if classifier not in BUILTIN_CLASSIFIERS:
        from pipelines.runtime import Runtime
        from pipelines.training import resolve_classifier

        classifier = resolve_classifier(Runtime.from_settings(settings), args.account, classifier)
    with ProgressBars() as progress:
        result = classify_file(
            args.input,
            args.output,
            settings,
            classifier=classifier,
            tile_size=args.tile_size,
            buffer=args.buffer,
            workers=args.workers,
            progress=progress,
        )
    if args.json:
        print_json({**vars(result), "units": result.units.to_dict()})
        return 0
    counts = ", ".join(f"{cls}: {n:,}" for cls, n in result.class_counts.items())
    seconds = sum(result.timings.values())
    judged = held_out_scores(result.classifier_params)
    version = f"version {result.classifier_version}" if judged else result.classifier_version
    print(f"wrote {args.output} ({result.output_points:,} points, classifier {result.classifier} {version})")
    if judged:
        print(f"judged on the account's held-out labels: macro F1 {judged[0]:.3f}, standard's {judged[1]:.3f}")
    print(f"classes: {counts}")
    print(f"coordinates: {result.units.describe()}")
    if result.sparse_points:
        print(
            f"{result.sparse_points:,} point(s) in tiles with fewer than {MIN_TILE_POINTS} points around them: too sparse to model, written as class 1"
        )
    # Every tile too sparse to model: no cluster was started, so there are no workers to name.
    where = f"on {result.workers} worker(s)" if result.workers else "without a cluster (nothing to model)"
    print(
        f"{result.tiles} tile(s) {where} in {seconds:.1f} s ({result.output_points / max(seconds, 1e-9) / 1e6:.2f} M points/s)"
    )
    return 0
