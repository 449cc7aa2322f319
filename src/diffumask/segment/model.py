"""One interface over the transformers segmenters we train: a loss on label maps, class scores per pixel.

SegFormer predicts logits at 1/4 of the input; they are upsampled to the input before the loss and
the argmax. Mask2Former predicts queries (a class distribution with a "no object" entry, and a mask
each); its per-pixel class scores are the sum over queries of P(class) × sigmoid(mask), as in
transformers' ``post_process_semantic_segmentation``, and its loss takes one binary mask per class
present in each label map (pixels labelled 255 belong to no mask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import library_bars
from .presets import Preset

IGNORE_INDEX = 255
_BACKBONE_PREFIX = {"segformer": "segformer.", "mask2former": "model.pixel_level_module.encoder."}


def _model_class(family: str) -> type:
    from transformers import Mask2FormerForUniversalSegmentation, SegformerForSemanticSegmentation

    return {"segformer": SegformerForSemanticSegmentation, "mask2former": Mask2FormerForUniversalSegmentation}[family]


def build_config(preset: Preset, class_names: list[str]) -> Any:
    """The transformers config of a preset for these classes (no download: every field is given)."""
    from transformers import Mask2FormerConfig, ResNetConfig, SegformerConfig, SwinConfig

    labels = {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}
    if preset.family == "segformer":
        return SegformerConfig(**preset.model, semantic_loss_ignore_index=IGNORE_INDEX, **labels)
    backbone_kwargs = dict(preset.backbone)
    backbone_type = backbone_kwargs.pop("model_type")
    backbone = {"swin": SwinConfig, "resnet": ResNetConfig}[backbone_type](**backbone_kwargs)
    return Mask2FormerConfig(backbone_config=backbone, ignore_value=IGNORE_INDEX, **preset.model, **labels)


#: Layers whose parameters are a normalisation's scale and shift: the list of Mask2Former's own training code
#: (detectron2's), with RMSNorm where torch has it.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
#: Parameters that are embeddings without living in an ``nn.Embedding``, as Mask2Former's code names them for Swin
#: (transformers' names): the relative position tables and the absolute position embeddings. (Its pixel decoder's
#: level embedding, a plain parameter there, is decayed as in that code; its query and level ``nn.Embedding``s are not.)
EMBEDDING_NAMES = ("relative_position_bias_table", "position_embeddings")


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name → "norm", "embed" or "other", by the module that owns it (and, for embeddings held as
    plain parameters, by name), as Mask2Former's optimizer tells them apart for their weight decay."""
    kinds = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            kind = ("norm" if isinstance(module, NORM_LAYERS) else
                    "embed" if isinstance(module, nn.Embedding) or name in EMBEDDING_NAMES else "other")
            kinds[f"{module_name}.{name}" if module_name else name] = kind
    return kinds


def semantic_to_mask_labels(labels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Mask2Former's targets: per image, one binary mask and one class id per class present."""
    masks, classes = [], []
    for label_map in labels:
        present = torch.unique(label_map)
        present = present[present != IGNORE_INDEX]
        masks.append((label_map[None] == present[:, None, None]).float())
        classes.append(present.long())
    return masks, classes


class Segmenter(nn.Module):
    """A transformers segmentation model behind ``loss(pixels, labels)`` and ``scores(pixels)``."""

    def __init__(self, family: str, model: nn.Module):
        super().__init__()
        self.family = family
        self.model = model

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def scores(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, classes, H, W) class scores at the input's size; their argmax is the prediction."""
        size = pixel_values.shape[-2:]
        if self.family == "segformer":
            logits = self.model(pixel_values=pixel_values).logits
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        out = self.model(pixel_values=pixel_values)
        classes = out.class_queries_logits.softmax(dim=-1)[..., :-1]
        masks = F.interpolate(out.masks_queries_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
        return torch.einsum("bqc,bqhw->bchw", classes, masks)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss (``forward`` so that DDP wrappers see it)."""
        return self.loss(pixel_values, labels)

    def loss(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.family == "segformer":
            logits = self.scores(pixel_values)
            if not bool((labels != IGNORE_INDEX).any()):
                return logits.sum() * 0.0  # nothing to learn from; keeps the graph (and DDP) intact
            return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
        masks, classes = semantic_to_mask_labels(labels)
        return self.model(pixel_values=pixel_values, mask_labels=masks, class_labels=classes).loss

    def parameter_groups(self, lr: float, backbone_lr_mult: float, weight_decay: float,
                         weight_decay_norm: float | None = None,
                         weight_decay_embed: float | None = None) -> list[dict[str, Any]]:
        """The recipe's groups: the backbone at lr × mult, everything else at lr; within each, normalisation
        layers' and embeddings' parameters at their own weight decay when one is given (None: ``weight_decay``,
        and then exactly the two groups of before, so older runs' optimizer states still load)."""
        prefix = _BACKBONE_PREFIX[self.family]
        decays = {"other": weight_decay,
                  "norm": weight_decay if weight_decay_norm is None else weight_decay_norm,
                  "embed": weight_decay if weight_decay_embed is None else weight_decay_embed}
        kinds = parameter_kinds(self.model) if weight_decay_norm is not None or weight_decay_embed is not None else {}
        groups: dict[tuple[bool, str], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            groups.setdefault((name.startswith(prefix), kinds.get(name, "other")), []).append(param)
        return [{"params": params, "lr": lr * backbone_lr_mult if in_backbone else lr, "weight_decay": decays[kind]}
                for (in_backbone, kind), params in sorted(groups.items(), key=lambda g: (not g[0][0], g[0][1]))]

    def save(self, folder: Path) -> None:
        with library_bars(False):  # transformers' per-shard bar says nothing here
            self.model.save_pretrained(folder)


def build_segmenter(preset: Preset, class_names: list[str]) -> Segmenter:
    """A randomly initialised segmenter of the preset's architecture for ``class_names``."""
    return Segmenter(preset.family, _model_class(preset.family)(build_config(preset, class_names)))


def load_segmenter(folder: Path, family: str) -> Segmenter:
    """A trained segmenter saved with ``Segmenter.save`` (``save_pretrained``)."""
    with library_bars(False):
        return Segmenter(family, _model_class(family).from_pretrained(folder))


def init_from(segmenter: Segmenter, source: str) -> dict[str, int]:
    """Copy pretrained weights into ``segmenter``: a whole model of the same family (heads whose shape
    differs, e.g. another class count, are left as they are) or a backbone (Swin, ResNet, SegFormer MiT).

    ``source`` is a local folder, or a hub id when online. Returns counts of loaded and skipped tensors.
    """
    from transformers import AutoConfig, ResNetBackbone, SegformerModel, SwinBackbone

    try:
        with library_bars(False):  # a hub id's config download too
            config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--init-from {source}: not a transformers model folder or reachable hub id ({error})") from None
    target_type = segmenter.model.config.model_type
    if config.model_type == target_type:
        with library_bars(False):
            state = _model_class(segmenter.family).from_pretrained(source).state_dict()
        target = segmenter.model
    else:
        backbones = {"swin": SwinBackbone, "resnet": ResNetBackbone, "segformer": SegformerModel}
        if config.model_type not in backbones:
            raise ConfigError(f"--init-from {source}: a {config.model_type} model is neither a {target_type} nor a "
                              f"backbone diffumask can load ({', '.join(backbones)})")
        target = (segmenter.model.segformer if segmenter.family == "segformer"
                  else segmenter.model.model.pixel_level_module.encoder)
        extra = {} if config.model_type == "segformer" else {"out_features": target.config.out_features}
        with library_bars(False):
            state = backbones[config.model_type].from_pretrained(source, **extra).state_dict()
    own = target.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not loadable:
        raise ConfigError(f"--init-from {source}: none of its weights fit the {target_type} being trained "
                          "(another architecture or size?)")
    target.load_state_dict(loadable, strict=False)
    return {"loaded": len(loadable), "skipped": len(own) - len(loadable)}
