"""``orion demo``, ``orion quickstart`` and ``orion ablate``: the end-to-end jobs."""

from __future__ import annotations

import argparse
import json


def _cmd_demo(args: argparse.Namespace) -> int:
    from orion_mllm.demo import run_demo

    summary = run_demo(preset=args.preset, out=args.out, steps=args.steps, seed=args.seed)
    before, after = summary["loss_before"], summary["loss_after"]
    print(
        f"\n{summary['preset']}: {summary['parameters']:,} parameters, "
        f"{summary['conversations']} conversations, "
        f"{summary['steps']} steps in {summary['wall_seconds']} s"
    )
    for key in ("ce", "mse", "kl"):
        print(f"  {key:4s} {before[key]:.4g} -> {after[key]:.4g}")
    print(f"  saved to {summary['model_dir']} and reloaded identically: {summary['reload_identical']}")
    print(json.dumps(summary))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from orion_mllm.workflow.quickstart import Quickstart

    qs = Quickstart(
        args.preset, args.out, max_steps=args.max_steps, eval_limit=args.eval_limit,
        from_scratch=args.from_scratch,
    )  # fmt: skip
    m = qs.run()
    print(
        f"\nquickstart {m['preset']} finished: {m['wall_minutes']:.1f} min of steps\n"
        f"  understanding  base {m['base_und_accuracy']:.3f} -> final {m['final_und_accuracy']:.3f}\n"
        f"  generation     shapes-gen overall {m['gen_overall']:.3f}\n"
        f"  editing        shapes-edit {m['edit_accuracy']:.3f}\n"
        f"  drift          KL(base || final) {m['drift_kl_final']:.4f}\n"
        f"  report         {qs.out / 'report.md'}\n"
        f"  model          {m['model_dir']}  (try: orion chat --model {m['model_dir']})"
    )
    print(json.dumps({k: m[k] for k in ("model_dir", "wall_minutes", "preset")}))
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from orion_mllm.workflow.ablate import Ablation

    ab = Ablation(
        args.preset, args.out, seeds=args.seeds, configs=args.configs, max_steps=args.max_steps,
        eval_limit=args.eval_limit, base=args.base,
    )  # fmt: skip
    if args.report_only:
        ab.write_table(ab.finished())
    else:
        ab.run()
    print((ab.out / "ablation.md").read_text())
    print(json.dumps({"table": str(ab.out / "ablation.md"), "json": str(ab.out / "ablation.json")}))
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    """``orion demo``."""
    p = sub.add_parser("demo", help="build a small model, train the three ORION losses, save and reload it")
    p.add_argument(
        "--preset", default="micro", choices=["micro", "tiny"], help="architecture preset (default: micro)"
    )
    p.add_argument("--out", default="runs/demo", help="where to save the trained model (default: runs/demo)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def workflow_options(p: argparse.ArgumentParser, name: str) -> None:
    """The options ``quickstart`` and ``ablate`` share."""
    p.add_argument("--out", default=None, help=f"run folder (default: runs/{name}-PRESET)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every training stage (smoke runs)")
    p.add_argument("--eval-limit", type=int, default=None, help="cap every evaluation set (smoke runs)")


def add_quickstart(sub: argparse._SubParsersAction) -> None:
    """``orion quickstart``."""
    p = sub.add_parser(
        "quickstart",
        help="the whole pipeline on ShapesWorld: base VLM, decoder, ORION stages 1-3, eval, report",
        description="Generate ShapesWorld data, train the base VLM (stage 0) and the decoder, run ORION "
        "stages 1-3, evaluate base and final models, write OUT/report.md and OUT/metrics.json. "
        "Re-running resumes.",
    )
    p.add_argument(
        "--preset", default="tiny", choices=["micro", "tiny"],
        help="tiny (default; under 30 min on 2 CPU cores from the committed base) or micro (a few minutes)",
    )  # fmt: skip
    p.add_argument(
        "--from-scratch", action="store_true",
        help="train the stage-0 base and the decoder here instead of starting from the ones committed in "
        "bases/PRESET (tiny: adds ~35 min on 2 CPU cores; micro has none and always trains them)",
    )  # fmt: skip
    workflow_options(p, "quickstart")
    p.set_defaults(func=_cmd_quickstart)


def add_ablate(sub: argparse._SubParsersAction) -> None:
    """``orion ablate``."""
    p = sub.add_parser(
        "ablate",
        help="Table 4 at ShapesWorld scale: vision heads, warm-up data, KL on/off, layer_mix; mean ± std",
        description="Run ORION stages 1-3 per configuration and seed from one shared stage-0 base and "
        "decoder (OUT/base), evaluate each, and write OUT/ablation.md and OUT/ablation.json. Configurations: "
        "A/B linear, C/D qformer (small/large warm-up, no KL), E0/E/F mlp (none/small/large, no KL), "
        "G mlp + KL (ORION), LM layer_mix + KL. Re-running resumes.",
    )
    p.add_argument("--preset", default="tiny", choices=["micro", "tiny"])
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default: 3)")
    p.add_argument("--configs", nargs="+", default=None, help="subset of A B C D E0 E F G LM (default: all)")
    p.add_argument(
        "--base", default=None, help="a finished `orion quickstart` folder whose stage-0 base and decoder "
        "all configurations share (default: train them in OUT/base)",
    )  # fmt: skip
    p.add_argument(
        "--report-only", action="store_true", help="train nothing: write the table from the runs finished "
        "so far (a long ablation's partial results; each row says how many seeds it holds)",
    )  # fmt: skip
    workflow_options(p, "ablate")
    p.set_defaults(func=_cmd_ablate)
