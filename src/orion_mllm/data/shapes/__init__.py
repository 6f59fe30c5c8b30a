"""ShapesWorld: a procedurally generated world of coloured shapes.

Used to train and evaluate small multimodal models, with GenEval-style automatic scoring of generated
images from pixels only.

* :mod:`.world` -- vocabulary (:data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`), :class:`Scene` and
  :func:`sample_scene`.
* :mod:`.render` -- :func:`render_scene` (anti-aliased PIL rendering).
* :mod:`.scorer` -- :func:`detect_objects`, :class:`Spec` and :func:`judge` / :func:`score_images`.
"""

from .render import render_scene
from .scorer import (
    CATEGORIES,
    Detection,
    ObjectSpec,
    Spec,
    detect_objects,
    judge,
    judge_detections,
    mismatched_spec,
    relative_position,
    sample_spec_and_scene,
    score_images,
)
from .world import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    place_objects,
    relation_holds,
    sample_scene,
)

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Detection",
    "ObjectSpec",
    "Scene",
    "ShapeObject",
    "Spec",
    "detect_objects",
    "judge",
    "judge_detections",
    "mismatched_spec",
    "place_objects",
    "relation_holds",
    "relative_position",
    "render_scene",
    "sample_scene",
    "sample_spec_and_scene",
    "score_images",
]
