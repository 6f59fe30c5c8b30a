"""Teacher-forced vs free-running visual-token regression of a quickstart model, rendered side by side.

    python benchmarks/regression_diag.py runs/qs-tiny4 runs/diag.png

For the first 8 text-to-image training records: the true tokens, the head's teacher-forced predictions
(previous *true* tokens as inputs) and the free-running ones (its own predictions fed back, as at
inference), each rendered with the model's decoder; prints the token variance and both MSEs.
"""

import sys
from pathlib import Path

import torch

from orion_mllm.data.records import encode_record
from orion_mllm.data.sources import ConversationSource
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.model.orion import backbone_hidden_states
from orion_mllm.sequence import attach_visual_tokens, collate
from orion_mllm.workflow.report import captioned_grid

run = Path(sys.argv[1])
pipe = OrionPipeline.load(run / "model", image_separator="\n")
m = pipe.model
root = run / "data" / "shapes-tiny"
src = ConversationSource("g", "generation", root / "gen.jsonl", root)
recs = [src.get(i).record for i in range(8)]
b = m.sequence_builder()
encs = [attach_visual_tokens(encode_record(b, r), m.encode_images) for r in recs]
true = [e.visual_tokens for e in encs]
batch = collate(encs, m.processor.tokenizer.pad_token_id)
with torch.no_grad():
    h, _ = backbone_hidden_states(m.backbone, batch, batch.visual_tokens)
    rows, cols = batch.visual_positions[:, 0], batch.visual_positions[:, 1]
    tf = m.predict_visual_tokens(h[rows, cols]).split(16)
pred, _ = zip(*[pipe.image_tokens(r["conversations"][0]["value"]) for r in recs], strict=True)
pred = [p[0] for p in pred]
for t, f, p in zip(true, tf, pred, strict=True):
    var, tf_mse, free_mse = t.var(0).mean(), ((t - f) ** 2).mean(), ((t - p) ** 2).mean()
    print(f"var {var:.5f}  teacher-forced mse {tf_mse:.5f}  free-running mse {free_mse:.5f}")
ims = pipe.render(true) + pipe.render(list(tf)) + pipe.render(list(pred))
captioned_grid(ims, ["true"] * 8 + ["teacher-forced"] * 8 + ["free"] * 8, cols=8).save(sys.argv[2])
