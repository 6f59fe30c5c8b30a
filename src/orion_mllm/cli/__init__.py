"""The ``orion`` command: one subcommand per job.

    orion demo  [--preset micro] [--out runs/demo] [--steps 200]   build, train 3 losses, save, reload
    orion build --preset tiny --out DIR [--head mlp]              write a random-init ORION model dir
    orion build --from-qwen QWEN_DIR --out DIR [--head mlp]       wrap a local Qwen2.5-VL with a new head
    orion info  DIR                                               describe a model directory
    orion presets                                                 list architecture presets
    orion data check FILE.jsonl [--image-root DIR] [--decode]     validate a conversation dataset
    orion data shapes --out DIR [--size 64] [--n-und N ...]       write the ShapesWorld datasets
    orion eval shapes-gen --oracle --out DIR [--size 64]          oracle renders in GenEval layout, scored
    orion eval shapes-score --images DIR                          score any GenEval-layout folder
    orion eval shapes-gen --model DIR --out DIR                   a model's images for the prompt set, scored
    orion eval shapes-und --model DIR [--n 200]                   understanding accuracy (held-out set)
    orion eval shapes-edit --model DIR [--n 200]                  editing accuracy (held-out set)
    orion eval drift --base DIR --model DIR [--images PATH]       semantic drift table + figure
    orion quickstart [--preset tiny|micro] [--out DIR]            the whole pipeline, report + metrics.json
    orion ablate [--preset tiny] [--seeds 3] [--configs A G ...]  Table 4 ablations, mean ± std over seeds
    orion train RECIPE.yaml [--output DIR] [--nproc N] [key=value ...]   one training stage (resumes)
    orion decode --decoder DIR --tokens T.safetensors -o out.png [--steps N --cfg S --seed S]
    orion convert nexus-gen-decoder SRC DST (--flux FLUX_DIR | --pooled FILE)
    orion generate --model DIR [--decoder DIR] "prompt" -o out.png [--n K] [--seed S] [--elaborate]
    orion ask --model DIR --image PATH [--image PATH ...] "question" [--max-new-tokens N]
    orion edit --model DIR [--decoder DIR] --image PATH "instruction" -o out.png
    orion chat --model DIR [--decoder DIR] [--out-dir DIR]          REPL; also reads piped input
    orion serve --model DIR [--decoder DIR] [--host 127.0.0.1] [--port 8000]   web chat + OpenAI API

Errors in user input print one line naming the problem and exit non-zero (``--debug`` for the
traceback).

One module per command group, each holding its parsers next to its handlers: ``model`` (build, info,
presets, convert), ``data``, ``train``, ``eval``, ``inference`` (decode, generate, ask, edit, chat),
``serve`` and ``workflow`` (demo, quickstart, ablate). This module assembles them into one parser and
owns the one error policy (``main``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from orion_mllm import __version__
from orion_mllm.cli import data, inference, model, serve, train, workflow
from orion_mllm.cli import eval as evaluation

# The subcommands in the order ``orion --help`` lists them.
SUBCOMMANDS = (
    workflow.add_demo, model.add_build, model.add_info, data.add_data, evaluation.add_eval,
    workflow.add_quickstart, workflow.add_ablate, train.add_train, inference.add_decode, model.add_convert,
    inference.add_generate, inference.add_ask, inference.add_edit, inference.add_chat, serve.add_serve,
    model.add_presets,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orion", description="ORION unified multimodal models on Qwen2.5-VL."
    )
    parser.add_argument("--version", action="version", version=f"orion-mllm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or data, reported in one line rather than a traceback."""
    from orion_mllm.train.anomaly import TrainingDiverged
    from orion_mllm.train.loop import DataQualityError

    return (ValueError, FileNotFoundError, OSError, TrainingDiverged, DataQualityError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``orion`` command; a user error prints ``orion CMD: error: ...`` and returns 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`orion train R.yaml --output D key=value`): argparse leaves those
    # unmatched, so take the key=value ones back here and reject anything else as usual.
    if extra and args.command == "train" and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except Exception as err:
        if args.debug or not isinstance(err, _user_errors()):
            raise
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports it once
            return 2
        print(f"orion {args.command}: error: {err}", file=sys.stderr)
        return 2
