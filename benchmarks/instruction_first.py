"""Run a repo command with edit prompts in the instruction-first form (issue 16, editing diagnosis).

    python benchmarks/instruction_first.py -m orion_mllm.cli eval shapes-edit --model M --data D --out O
    python benchmarks/instruction_first.py benchmarks/edit_diag.py --model M --data D --file edit_first.jsonl

``OrionPipeline.image_prompts`` puts the source image before the request (``<image>\\nInstruction``),
the form ShapesWorld's and users' editing records have. With the instruction first the M-RoPE offset from
a source cell to the same cell of the target is the same for every edit, whatever the instruction's
length; this wrapper asks a model trained on instruction-first records in that form, so
``orion eval shapes-edit`` and ``benchmarks/edit_diag.py`` measure it unchanged otherwise.
Text-to-image prompts (no source image) are left as they are.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence

from PIL import Image

from orion_mllm.inference import pipeline
from orion_mllm.inference.engine import Prompt
from orion_mllm.inference.session import ChatSession, UserImage

_source_first = pipeline.OrionPipeline.image_prompts


def instruction_first_prompts(
    self: pipeline.OrionPipeline, requests: Sequence[str], *, seed: int = 0,
    sources: Sequence[Image.Image] | None = None, guidance: float | None = None, system: str | None = None,
) -> list[Prompt]:  # fmt: skip
    if sources is None:
        return _source_first(self, requests, seed=seed, sources=sources, guidance=guidance, system=system)
    if (guidance if guidance is not None else self.default_guidance) != 1.0:
        raise SystemExit("instruction_first.py: guided edits are not supported (use guidance 1)")
    prompts = []
    for k, (request, source) in enumerate(zip(requests, sources, strict=True)):
        session = ChatSession(system_prompt=system)
        session.add("user", [request, UserImage(source)])
        prompts.append(self.prompt(session, open_image=True, seed=seed + k))
    return prompts


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    pipeline.OrionPipeline.image_prompts = instruction_first_prompts
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__")
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
