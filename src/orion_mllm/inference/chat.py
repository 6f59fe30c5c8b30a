"""``orion chat``: a REPL over a ``ChatSession`` (also reads piped input, for scripts).

Commands: ``/image PATH`` attaches an image to the next message, ``/draw PROMPT`` asks for an image
(the reply starts with one), ``/save FILE``, ``/load FILE``, ``/reset``, ``/help``, ``/quit``.
Any other line is a user message; the model may answer with text, images or both. A system prompt
(``--system``) starts every new session (a loaded one keeps its own). Generated images
are rendered (when there is a decoder) into the output folder and their paths printed; they stay in
the context as the tokens the model predicted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from orion_mllm.images import ImageLoadError, load_image
from orion_mllm.inference.engine import SamplingConfig
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.inference.session import ChatSession, UserImage

HELP = (
    "/image PATH  attach an image to your next message\n"
    "/draw TEXT   ask for an image (the reply starts with one)\n"
    "/save FILE   save the session (FILE.json + FILE.safetensors)\n"
    "/load FILE   load a saved session\n"
    "/reset       start over\n"
    "/quit        leave (also Ctrl-D)"
)


class ChatRepl:
    def __init__(
        self, pipeline: OrionPipeline, out_dir: str | Path, sampling: SamplingConfig, *, seed: int = 0,
        stdin: TextIO | None = None, stdout: TextIO | None = None, system: str | None = None,
    ) -> None:  # fmt: skip
        self.pipe = pipeline
        self.out_dir = Path(out_dir)
        self.sampling = sampling
        self.seed = seed
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.system = system
        self.session = ChatSession(system_prompt=system)
        self.pending: list[UserImage] = []
        self.images_written = 0
        self.errors = 0

    def say(self, text: str) -> None:
        if text.startswith("error:"):
            self.errors += 1
        print(text, file=self.stdout, flush=True)

    def _turn(self, text: str, *, draw: bool) -> None:
        self.session.add("user", [*self.pending, text])
        self.pending = []
        try:
            reply = self.pipe.reply(self.session, self.sampling, open_image=draw, seed=self.seed)
        except Exception:
            self.session.turns.pop()  # the failed turn is not kept
            raise
        self.seed += 1
        if reply.images and self.pipe.decoder is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            rendered = self.pipe.render([im.tokens for im in reply.images], seed=self.seed)
            for img, gen in zip(rendered, reply.images, strict=True):
                path = self.out_dir / f"image_{self.images_written:03d}.png"
                img.save(path)
                gen.path = str(path)
                self.images_written += 1
        for part in reply.parts:
            if isinstance(part, str):
                self.say(f"assistant: {part}")
            else:
                self.say(f"assistant: [image: {part.path or 'not rendered (no decoder)'}]")
        if not reply.parts:
            self.say("assistant: (empty reply)")

    def handle(self, line: str) -> bool:
        """Process one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/reset":
            self.session, self.pending = ChatSession(system_prompt=self.system), []
            self.say("session reset")
        elif cmd == "/image":
            if not arg:
                self.say("error: /image needs a path")
                return True
            try:
                self.pending.append(UserImage(load_image(arg, where="/image"), arg))
            except ImageLoadError as err:
                self.say(f"error: {err}")
                return True
            self.say(f"attached {arg}")
        elif cmd == "/save":
            if not arg:
                self.say("error: /save needs a file name")
                return True
            self.say(f"saved {self.session.save(arg)}")
        elif cmd == "/load":
            try:
                self.session, self.pending = ChatSession.load(arg), []
            except (OSError, ValueError) as err:
                self.say(f"error: {err}")
                return True
            self.say(f"loaded {len(self.session.turns)} turns from {arg}")
        elif cmd == "/draw":
            if not arg:
                self.say("error: /draw needs a description")
                return True
            self._turn(arg, draw=True)
        elif cmd.startswith("/"):
            self.say(f"error: unknown command {cmd} (/help lists them)")
        else:
            self._turn(line, draw=False)
        return True

    def run(self) -> int:
        interactive = self.stdin.isatty()
        if interactive:
            self.say("ORION chat. /help for commands, /quit to leave.")
        while True:
            if interactive:
                print("you: ", end="", file=self.stdout, flush=True)
            line = self.stdin.readline()
            # Piped input (scripts): a non-zero exit when any line failed.
            status = 1 if self.errors and not interactive else 0
            if not line:
                return status
            try:
                if not self.handle(line):
                    return 1 if self.errors and not interactive else 0
            except (ValueError, OSError) as err:  # one bad turn does not end the session
                self.say(f"error: {err}")
