"""One entry of a recipe's ``data`` list: which file, in which format, for which task, how often.

Recipes (``orion_mllm.train.recipe``) validate their ``data`` section into ``DatasetEntry`` objects and
``orion_mllm.data.sources.open_dataset`` opens one; it lives here, with the readers, so that the data
layer does not depend on the training layer above it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DatasetEntry(BaseModel):
    # Strict like every recipe section: an unknown key or a wrong type is an error naming the key.
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    name: str
    path: str = Field(description="a .jsonl file, a caption list (.txt/.jsonl) or a webdataset shard pattern")
    format: Literal["conversations", "captions", "webdataset"] = "conversations"
    task: Literal["understanding", "generation", "editing", "mixed"]
    weight: float = Field(gt=0, description="relative sampling weight within the mixture")
    image_root: str | None = None
    regress_images: bool = Field(
        default=True,
        description="false: the assistant's pictures are context for later turns and regress nothing (no "
        "MSE / KL / input noise); for dialogues whose request does not determine the picture, such as "
        "ShapesWorld's draw-then-ask ('Make a picture of some shapes.'), whose regression would teach the "
        "mean picture",
    )
    qtypes: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        description="keep only the records whose 'qtype' field is one of these (ShapesWorld records carry "
        "one); for one phase of a curriculum, e.g. multiple choice only",
    )

    @model_validator(mode="after")
    def _qtypes_need_conversations(self) -> DatasetEntry:
        if self.qtypes is not None and self.format != "conversations":
            raise ValueError(f"dataset {self.name!r}: qtypes selects conversation records, not {self.format}")
        return self
