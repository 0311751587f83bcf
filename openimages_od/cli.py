"""The ``oiod`` command line: thin.

Each subcommand parses its arguments, loads the layered config and calls one
importable function (``module:function`` in :data:`COMMANDS`), which tests call
directly too. Implementations are imported lazily so ``oiod plan`` never
imports TensorFlow and ``oiod --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from openimages_od import __version__
from openimages_od.config import Config, load_config
from openimages_od.errors import OiodError

log = logging.getLogger("openimages_od")

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "plan": (
        "openimages_od.openimages.plan",
        "run_plan",
        "Parse Open Images metadata, select classes and write the label map and shard plan.",
    ),
    "prepare": (
        "openimages_od.pipeline.distribute",
        "run_prepare",
        "Download, verify, rotate/resize images and write TFRecord shards on Ray.",
    ),
    "train": (
        "openimages_od.training.train",
        "run_train",
        "Train a TF Model Garden RetinaNet from the shards.",
    ),
    "evaluate": (
        "openimages_od.training.evaluate",
        "run_evaluate",
        "Evaluate checkpoints: COCO mAP and the Open Images detection metric.",
    ),
    "predict": (
        "openimages_od.training.predict",
        "run_predict",
        "Batch inference over a split or images: challenge CSV + COCO results JSON.",
    ),
    "export": (
        "openimages_od.training.export",
        "run_export",
        "Export a SavedModel with label map and model.json.",
    ),
    "export-dataset": (
        "openimages_od.convert.export",
        "run_export_dataset",
        "Convert the committed shards to COCO, YOLO or Pascal VOC (images + annotations).",
    ),
    "serve": ("openimages_od.serving.app", "run_serve", "Serve the exported model over HTTP."),
    "detect": ("openimages_od.serving.detect", "run_detect", "Detect objects in local images or URLs."),
    "report": ("openimages_od.report", "run_report", "Write the HTML dataset/evaluation report."),
    "status": (
        "openimages_od.dataset",
        "run_status",
        "Plan vs output: committed/stale/missing shards, cache, what prepare would fetch (exit 0 = up to date).",
    ),
    "demo": (
        "openimages_od.demo",
        "run_demo",
        "Run the whole path end to end on a generated Open Images-format dataset.",
    ),
}


def _add_common(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        required=config_required,
        help="YAML config (layered over built-in defaults; see configs/).",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one config value, e.g. --set ray.num_actors=4 (repeatable; value parsed as YAML).",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="More logging (-vv for debug).")
    p.add_argument("--debug", action="store_true", help="Show tracebacks for unexpected errors.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oiod",
        description="openimages-od: Open Images -> TFRecord shards -> RetinaNet -> served detector.",
    )
    parser.add_argument("--version", action="version", version=f"oiod {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        if name == "prepare":
            p.add_argument(
                "--retry-failed",
                action="store_true",
                help="Re-fetch only images the ledger records as failed (committed shards are rewritten).",
            )
            p.add_argument(
                "--skip-plan", action="store_true", help="Fail if no plan exists instead of planning first."
            )
        elif name == "evaluate":
            p.add_argument(
                "--continuous",
                action="store_true",
                help="Watch model_dir and evaluate every new checkpoint until SIGTERM or evaluate.timeout_s.",
            )
            p.add_argument(
                "--checkpoint", metavar="PATH", help="Evaluate this checkpoint instead of the latest."
            )
            p.add_argument(
                "--predictions",
                metavar="FILE",
                help="Score this predictions file (challenge CSV or COCO results JSON) instead of a model.",
            )
            p.add_argument(
                "--format",
                dest="predictions_format",
                choices=["auto", "csv", "coco"],
                default=None,
                help="Format of --predictions (default: from the content / extension).",
            )
        elif name == "predict":
            p.add_argument(
                "--model", metavar="URL", help="An exported model (oiod export); default: a checkpoint."
            )
            p.add_argument(
                "--checkpoint", metavar="PATH", help="This checkpoint instead of the latest in model_dir."
            )
            p.add_argument(
                "--split", help="Predict the committed shards of this split (default evaluate.split)."
            )
            p.add_argument(
                "--images", nargs="+", metavar="IMAGE", help="Predict these images (paths or URLs)."
            )
            p.add_argument(
                "--image-list", metavar="FILE", help="A file listing images to predict, one a line."
            )
            p.add_argument(
                "--out", metavar="URL", help="Output folder (default {output}/predictions/{split})."
            )
            p.add_argument("--ray", action="store_true", help="Run on ray.num_actors Ray actors.")
        elif name == "export":
            p.add_argument(
                "--checkpoint", metavar="PATH", help="Export this checkpoint instead of the latest."
            )
        elif name == "export-dataset":
            from openimages_od.convert import FORMATS

            p.add_argument(
                "--format",
                dest="export_format",
                required=True,
                choices=sorted(FORMATS),
                help="Output layout.",
            )
            p.add_argument(
                "--split",
                action="append",
                metavar="S",
                help="Export this split (repeatable; default every prepared split).",
            )
            p.add_argument(
                "--out",
                metavar="URL",
                help="Export folder, local or s3:// (default {output}/exports/{format}).",
            )
        elif name == "serve":
            p.add_argument(
                "--model", metavar="URL", help="Exported model dir (path or s3://); default serve.model."
            )
            p.add_argument("--host", help="Bind address (default serve.host).")
            p.add_argument("--port", type=int, help="Port (default serve.port).")
        elif name == "detect":
            p.add_argument(
                "--model", metavar="URL", help="Exported model dir (path or s3://); default serve.model."
            )
            p.add_argument(
                "images", nargs="+", metavar="IMAGE_OR_URL", help="Local files or http(s)/s3 URLs."
            )
            p.add_argument("--out", metavar="DIR", help="Write annotated images here.")
            p.add_argument(
                "--min-score", type=float, metavar="S", help="Minimum score (default serve.min_score)."
            )
        elif name == "status":
            p.add_argument("--json", dest="json_out", action="store_true", help="Print the status as JSON.")
        elif name == "report":
            p.add_argument(
                "--out", metavar="URL", help="Where to write the report (default {output}/report.html)."
            )
        elif name == "demo":
            p.add_argument(
                "--workdir", metavar="DIR", help="Where the demo writes everything (default ./oiod-demo)."
            )
            p.add_argument("--images", type=int, metavar="N", help="Generated images (default 240).")
            p.add_argument("--steps", type=int, metavar="N", help="Training steps (default 600).")
    return parser


def _cli_overrides(args: argparse.Namespace) -> list[str]:
    """Flags that are shorthands for config keys, applied after --set."""
    out: list[str] = []
    for flag, key in (
        ("model", "serve.model"),
        ("host", "serve.host"),
        ("port", "serve.port"),
        ("min_score", "serve.min_score"),
    ):
        val = getattr(args, flag, None)
        if val is not None:
            out.append(f"{key}={val}")
    return out


_COMMON = {"command", "config", "overrides", "verbose", "debug", "model", "host", "port", "min_score"}


def _command_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Subcommand-specific options, passed as keyword arguments to the command function."""
    kwargs = {k: v for k, v in vars(args).items() if k not in _COMMON and v is not None}
    if args.command == "predict" and args.model:
        kwargs["model"] = args.model  # an export to predict with, not serve.model
    if args.command == "demo" and args.overrides:
        kwargs["overrides"] = list(args.overrides)  # the demo builds its own config, then applies these
    return kwargs


def _setup_logging(verbosity: int) -> None:
    """Our own progress at INFO; third-party libraries (TF, absl, boto) only warn unless -vv."""
    logging.basicConfig(
        level=logging.DEBUG if verbosity >= 2 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("openimages_od").setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    if verbosity < 2:
        for noisy in (
            "botocore",
            "boto3",
            "urllib3",
            "s3transfer",
            "aiohttp.access",
            "absl",
            "tensorflow",
            "h5py",
        ):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)  # Keras serialization chatter on export
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
        import warnings

        warnings.filterwarnings("ignore", message="Input dict contained keys", category=UserWarning)


def resolve(command: str) -> Callable[..., Any]:
    """The function behind ``oiod <command>``, imported on first use (TensorFlow and Ray load late).

    Raises:
        OiodError: a third-party package the command needs is not installed (naming it and the extra).
    """
    module, func = COMMANDS[command][:2]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            raise  # the command's own module is missing: a broken install, not a user error
        raise OiodError(
            f"oiod {command} needs the Python package {exc.name!r}, which is not installed "
            f"(install the matching extra, e.g. pip install 'openimages-od[train,serve]')"
        ) from exc
    fn: Callable[..., Any] = getattr(mod, func)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    debug = args.debug or os.environ.get("OIOD_DEBUG") == "1"
    try:
        cfg: Config = load_config(args.config, list(args.overrides) + _cli_overrides(args))
        fn = resolve(args.command)
        result = fn(cfg, **_command_kwargs(args))
        return int(result) if isinstance(result, int) else 0
    except OiodError as exc:
        print(f"oiod {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # storage and file errors name their URL/path
        if debug:
            raise
        print(f"oiod {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"oiod {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(
            f"oiod {args.command}: internal error: {type(exc).__name__}: {exc} "
            f"(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
