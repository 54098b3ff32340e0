"""The CNN over a set of frames' stored crops: the one place training and evaluation embed cells.

Stored crops are cut by the same in-graph `crop_cells` geometry the served crop_embedder uses (a wider view whose
centre is the served crop; `stored_to_served` takes it), so these embeddings are the served ones.
"""

from __future__ import annotations

import numpy as np
import torch

from leukograph.client.contract import CLASSES
from leukograph.training.augment import augment_batch, stain_shift
from leukograph.training.cells import FrameCells
from leukograph.training.models import STORE_ZOOM, CropEmbedder, served_size
from leukograph.training.views import view_crops, view_scale, view_stored


@torch.no_grad()
def embed_frames(model: CropEmbedder, frames: list[FrameCells], augment: bool = False, batch: int = 128,
                 seed: int = 0, stain_strength: float = 0.0, view: int = 0,
                 rows: list[np.ndarray] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(embeddings, CNN probabilities) per frame, in eval mode, on the served crops (or augmented views of them, or
    the served crops under a deterministic synthetic stain shift of `stain_strength`), in view `view`
    (`views.view_stored`: flipped or turned, and read at a scale; 0: as served; augmented crops flip and turn only).

    `rows`: only these cells of each frame go through the CNN (and are returned, in frame order). Every crop is
    still cut, augmented and shifted in its place, so a cell gets the same augmentation and shift as in a full
    pass."""
    if augment and view_scale(view) != 1.0:
        raise ValueError("augmented crops are already scaled at random: view them at scale 1")
    model.eval()
    device = next(model.parameters()).device  # crops are cut and augmented on the CPU, the CNN runs where it is
    generator = torch.Generator().manual_seed(seed)
    index = [(f, i) for f, frame in enumerate(frames) for i in range(len(frame.labels))]
    masks = [np.ones(len(frame.labels), bool) for frame in frames]
    for mask, chosen in zip(masks, rows or []):
        mask[:] = False
        mask[chosen] = True
    wanted = torch.from_numpy(np.concatenate(masks)) if masks else torch.zeros(0, dtype=torch.bool)
    embeddings, probs = [], []
    for start in range(0, len(index), batch):
        crops = np.stack([frames[f].crops[i] for f, i in index[start:start + batch]])
        if served_size(crops.shape[1]) != model.crop_size:
            raise ValueError(f"cells were cut for a {served_size(crops.shape[1])} px crop, the CNN takes "
                             f"{model.crop_size} px: build them with use_crop_size({model.crop_size})")
        x = view_crops(augment_batch(crops, generator, STORE_ZOOM), view) if augment else view_stored(crops, view)
        if stain_strength > 0:
            x = stain_shift(x, stain_strength, seed + start)
        x = x[wanted[start:start + batch]]
        if len(x) == 0:
            continue
        emb, logits = model(x.to(device))
        embeddings.append(emb.cpu().numpy())
        probs.append(torch.softmax(logits, 1).cpu().numpy())
    embeddings_all = np.concatenate(embeddings) if embeddings else np.zeros((0, model.classifier.in_features))
    probs_all = np.concatenate(probs) if probs else np.zeros((0, len(CLASSES)))
    out, start = [], 0
    for mask in masks:
        n = int(mask.sum())
        out.append((embeddings_all[start:start + n], probs_all[start:start + n]))
        start += n
    return out
