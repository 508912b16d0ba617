"""One forward pass per batch -> logits, penultimate features and (on request) per-block features.

Uses timm's own hooks, so it works for any timm model: `forward_intermediates` for the
residual blocks' feature maps and the final map, `forward_head(pre_logits=True)` for the
penultimate features, `forward_head` for the logits. Block maps are reduced batch by batch
to what the scorer asks for (`Scorer.reduce_block`: pooled means, Gram row-sums), so the
large maps never leave the batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from disttrain.ood.scorers import Features


def residual_block_indices(model: torch.nn.Module, num_blocks: int = 4) -> list[int]:
    """The last `num_blocks` feature levels (the stage outputs of a ResNet; the stem excluded)."""
    levels = len(model.feature_info)
    return list(range(max(0, levels - num_blocks), levels))


class FeatureExtractor:
    def __init__(self, model: torch.nn.Module, reduce_block: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 num_blocks: int = 4):
        self.model = model
        self.reduce_block = reduce_block
        self.indices = residual_block_indices(model, num_blocks) if reduce_block is not None else []

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Features:
        if self.indices:
            final, maps = self.model.forward_intermediates(images, indices=self.indices)
            blocks = [self.reduce_block(m.float()) for m in maps]
        else:
            final, blocks = self.model.forward_features(images), None
        penultimate = self.model.forward_head(final, pre_logits=True)
        logits = self.model.forward_head(final)  # pools again (cheap): right for every head layout
        return Features(logits=logits.float(), penultimate=penultimate.float(), blocks=blocks, labels=labels)


def concat(parts: list[Features]) -> Features:
    """Batches -> one Features (all parts must carry the same fields)."""
    first = parts[0]
    return Features(
        logits=torch.cat([p.logits for p in parts]),
        penultimate=None if first.penultimate is None else torch.cat([p.penultimate for p in parts]),
        blocks=None if first.blocks is None else [torch.cat([p.blocks[i] for p in parts])
                                                   for i in range(len(first.blocks))],
        labels=None if first.labels is None else torch.cat([p.labels for p in parts]))


def take(features: Features, order: torch.Tensor | slice) -> Features:
    """Rows `order` of every field."""
    return features.rows(order)


def to_cpu(features: Features) -> Features:
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().cpu()

    return Features(logits=cpu(features.logits), penultimate=cpu(features.penultimate),
                    blocks=None if features.blocks is None else [cpu(b) for b in features.blocks],
                    labels=cpu(features.labels))
