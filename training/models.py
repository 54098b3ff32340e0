"""The models: in-graph cell cropping, the CNN crop embedder, the cell-graph GNN (PyG and dense), the seed baseline.

The crop geometry (`crop_cells`), node geometry (`geometry_features`) and the kNN rule are written once here and used
by training, by `classify`, and inside the exported ONNX graphs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch_geometric.nn import SAGEConv

from leukograph.client.contract import (
    CROP_MARGIN,
    CROP_SIZE,
    EMBED_DIM,
    KNN_K,
    NUM_CLASSES,
)

# The seed baseline's 4 outputs, in its checkpoint's order.
BASELINE_CLASSES: tuple[str, ...] = ("neutrophil", "eosinophil", "lymphocyte", "monocyte")
STANDARDISE_EPS = 1e-3
# "Far away" for padded kNN columns; fits in fp16 (max 65504) since centroids are normalised to [0, 1].
FAR = 1.0e4


# ---- crop geometry --------------------------------------------------------------------------------------
def crop_regions(boxes: Tensor, margin: float = CROP_MARGIN, zoom: float = 1.0) -> Tensor:
    """Square regions (cx, cy, side) around boxes [N,4]: the longer side plus `margin` of it on each side
    (times `zoom`: training stores a wider view, see STORE_SIZE)."""
    cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
    cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * ((1.0 + 2.0 * margin) * zoom)
    return torch.stack([cx, cy, side], dim=1)


# Training stores each cell as a STORE_SIZE crop of a STORE_ZOOM times wider region, sampled on the same pixel grid
# as the served crop: its centre CROP_SIZE square is exactly the served crop, and the border leaves room for scale
# and shift augmentation.
# The CNN's crop side is a hyperparameter its checkpoint carries (`CropEmbedder.crop_size`, a multiple of 8; the
# served contract does not change with it, the crop is cut inside the graph); CROP_SIZE is the default.
def check_crop_size(side: int, name: str = "crop_size") -> int:
    """The one rule for a crop side: a multiple of 8 (so the stored view's pad is whole) and >= 32."""
    if side % 8 or side < 32:
        raise ValueError(f"{name} must be a multiple of 8 and >= 32, got {side}")
    return side


def store_pad(crop_size: int) -> int:
    return crop_size // 8


def store_size(crop_size: int) -> int:
    """Side of the stored crop for a served crop of `crop_size`: a STORE_ZOOM wider view, same pixel grid."""
    return crop_size + 2 * store_pad(crop_size)


STORE_PAD = store_pad(CROP_SIZE)
STORE_SIZE = store_size(CROP_SIZE)
STORE_ZOOM = STORE_SIZE / CROP_SIZE  # the same for every crop side (a multiple of 8)


def served_size(stored_side: int, zoom: float = STORE_ZOOM) -> int:
    """The served crop's side for stored crops of `stored_side` that are a `zoom` times wider view."""
    return round(stored_side / zoom)


def crop_cells(frame: Tensor, boxes: Tensor, size: int = CROP_SIZE, margin: float = CROP_MARGIN,
               zoom: float = 1.0) -> Tensor:
    """Crop and resize every cell in-graph: frame uint8 [H,W,3] RGB, boxes [N,4] -> float [N,3,size,size] in 0..1.

    Bilinear `grid_sample` with zero padding outside the frame (black, like the 4-class augmentation fill).
    Exports to ONNX GridSample, which TensorRT implements natively.
    """
    frame = frame.to(torch.float32)  # first: TensorRT lets a uint8 input feed nothing but a Cast
    height, width = frame.shape[0], frame.shape[1]
    image = frame.permute(2, 0, 1).unsqueeze(0) * (1.0 / 255.0)  # 1,3,H,W
    regions = crop_regions(boxes.to(torch.float32), margin, zoom)
    steps = (torch.arange(size, dtype=torch.float32, device=boxes.device) + 0.5) / size - 0.5  # S, in (-0.5, 0.5)
    xs = regions[:, 0:1] + steps.unsqueeze(0) * regions[:, 2:3]  # N,S pixel x of each sample
    ys = regions[:, 1:2] + steps.unsqueeze(0) * regions[:, 2:3]  # N,S
    gx = xs * (2.0 / width) - 1.0  # align_corners=False: -1 is the left edge of pixel 0
    gy = ys * (2.0 / height) - 1.0
    n = boxes.shape[0]
    grid = torch.stack([gx.unsqueeze(1).expand(n, size, size), gy.unsqueeze(2).expand(n, size, size)], dim=-1)
    grid = grid.reshape(1, n * size, size, 2)
    crops = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # 1,3,N*S,S
    return crops.reshape(3, n, size, size).permute(1, 0, 2, 3)


# ---- CNN crop embedder ----------------------------------------------------------------------------------
def standardise_colour(crops: Tensor, eps: float = STANDARDISE_EPS) -> Tensor:
    """Per-crop, per-channel standardisation: (x - mean) / std over each crop's pixels, for each of R, G, B.

    Any per-channel gain and offset (white balance, lamp colour, exposure, a stain's overall cast) cancels, so
    every lab's crop reaches the CNN on the same footing. Runs inside the exported graph (ReduceMean, Sub, Mul,
    Sqrt, Div), so training and serving see exactly the same thing."""
    mean = crops.mean(dim=(2, 3), keepdim=True)
    centred = crops - mean
    std = torch.sqrt((centred * centred).mean(dim=(2, 3), keepdim=True) + eps * eps)
    return centred / std


class InstanceBatchNorm(nn.Module):
    """IBN-a (Pan et al. 2018): the first half of the channels normalised per crop (InstanceNorm, learnt affine), the
    rest per batch, so a block's contrast and texture statistics of one crop do not carry its lab's look onward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.instance = nn.InstanceNorm2d(self.half, affine=True)
        self.batch = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: Tensor) -> Tensor:
        per_crop, per_batch = torch.split(x, [self.half, x.shape[1] - self.half], 1)
        return torch.cat([self.instance(per_crop.contiguous()), self.batch(per_batch.contiguous())], 1)


class ServedInstanceBatchBlock(nn.Module):
    """A trained IBN block (conv, `InstanceBatchNorm`, ReLU) and the max-pool after it, as served: two convolutions,
    the batch-normalised half folded into its own (weights scaled, running statistics in a bias; ONNX Runtime then
    fuses conv, bias and ReLU), each half pooled before the two are joined (ReLU and max-pooling act per channel, so
    the order does not change the result). The trained block's eval output to float rounding, at half of its extra
    cost per cell in ONNX Runtime (README "Other labs' white cells without labels")."""

    def __init__(self, block: nn.Sequential, pool: nn.MaxPool2d) -> None:
        super().__init__()
        conv, norm = block[0], block[1]
        weight = conv.weight.detach()
        self.conv_instance = nn.Conv2d(conv.in_channels, norm.half, 3, padding=1, bias=False)
        self.conv_instance.weight.data = weight[:norm.half].clone()
        self.instance = copy.deepcopy(norm.instance)
        batch = norm.batch
        self.conv_batch = nn.Conv2d(conv.in_channels, conv.out_channels - norm.half, 3, padding=1, bias=True)
        self.conv_batch.weight, self.conv_batch.bias = fuse_conv_bn_weights(
            weight[norm.half:], None, batch.running_mean, batch.running_var, batch.eps, batch.weight.detach(),
            batch.bias.detach())
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        per_crop = self.pool(torch.relu(self.instance(self.conv_instance(x))))
        return torch.cat([per_crop, self.pool(torch.relu(self.conv_batch(x)))], 1)


def served_form(embedder: CropEmbedder) -> CropEmbedder:
    """The CNN as the served stage runs it (eval only: batch statistics are folded in): the embedder itself, or for
    an `--ibn` CNN a copy whose IBN blocks are `ServedInstanceBatchBlock`s."""
    if not embedder.ibn:
        return embedder
    served = copy.deepcopy(embedder).eval()
    layers, features = list(served.features), []
    while layers:
        layer = layers.pop(0)
        if isinstance(layer, nn.Sequential) and isinstance(layer[1], InstanceBatchNorm):
            layer = ServedInstanceBatchBlock(layer, layers.pop(0))
        features.append(layer)
    served.features = nn.Sequential(*features)
    return served


def _conv(cin: int, cout: int, ibn: bool = False) -> nn.Sequential:
    # BatchNorm, not GroupNorm: GroupNorm(8) did not start learning within the CPU budget (40 batches of 128, same
    # data and augmentation: loss 2.16, at chance, vs 1.72 with BatchNorm). The input's per-crop colour
    # standardisation keeps BatchNorm's statistics away from any lab's colour.
    norm = InstanceBatchNorm(cout) if ibn else nn.BatchNorm2d(cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm, nn.ReLU(inplace=True))


class CropEmbedder(nn.Module):
    """Small VGG-style CNN: 64x64 crop -> EMBED_DIM embedding (+ per-crop logits for CNN-only use).

    Input colour is standardised per crop (`standardise_colour`) inside the graph, so the BatchNorm statistics
    learnt in training see every lab's crops on the same colour footing."""

    def __init__(self, embed_dim: int = EMBED_DIM, num_classes: int = NUM_CLASSES, width: int = 32,
                 crop_size: int = CROP_SIZE, ibn: bool = False) -> None:
        super().__init__()
        self.crop_size = check_crop_size(crop_size)  # side of the square crop the served graph cuts for this CNN
        self.ibn = ibn  # InstanceBatchNorm in the first two blocks (`leukograph train --ibn`)
        w = width
        self.features = nn.Sequential(
            _conv(3, w, ibn), nn.MaxPool2d(2),  # 32
            _conv(w, w, ibn), nn.MaxPool2d(2),  # 16
            _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2),  # 8
            _conv(2 * w, 4 * w), _conv(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, embed_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """crops float [N,3,S,S] in 0..1 -> (embeddings [N,D], logits [N,C])."""
        embeddings = self.embed(self.features(standardise_colour(crops)))
        return embeddings, self.classifier(embeddings)


# ---- node geometry and graph ------------------------------------------------------------------------------
def median_1d(values: Tensor) -> Tensor:
    """Median of a 1-D tensor using only comparisons and reductions (exports without Sort or dynamic TopK).

    For an even count it returns the lower-ranked of the two middle values, as torch.median does."""
    n = values.shape[0]
    less = (values.unsqueeze(0) < values.unsqueeze(1)).to(torch.float32).sum(1)
    equal = (values.unsqueeze(0) == values.unsqueeze(1)).to(torch.float32).sum(1)
    # value i covers ranks [less, less + equal - 1]; the lower median rank is (n - 1) // 2
    target = torch.div(torch.as_tensor(n, dtype=torch.float32) - 1.0, 2.0, rounding_mode="floor")
    covers = (less <= target) & (less + equal - 1.0 >= target)
    return values[torch.argmax(covers.to(torch.float32))]


# The node geometry a GNN reads (its checkpoint's `geometry`):
# * "frame" (the release): log size / median cell size (most cells in a smear are RBCs, so the median is an RBC's
#   size), log aspect, the centroid as a fraction of the frame, and log median cell size / shorter frame side.
# * "cells": the first two only, so nothing depends on the camera's field of view or framing. Measured against
#   "frame" (README "Node geometry"): 4 points better on PBC cells placed in a 1000 px field, 1-4 points worse on
#   PBC cells as given or magnified, mixed on the lab left out of training; not released.
GEOMETRY_FEATURES = {"cells": 2, "frame": 5}


def geometry_features(boxes: Tensor, frame_size: Tensor, geometry: str = "frame") -> Tensor:
    """[N, GEOMETRY_FEATURES[geometry]] node geometry (see GEOMETRY_FEATURES)."""
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    sizes = torch.sqrt(widths * heights)
    reference = median_1d(sizes)
    features = [torch.log(sizes / reference), torch.log(widths / heights)]
    if geometry == "frame":
        frame_h, frame_w = frame_size[0], frame_size[1]
        features += [(boxes[:, 0] + boxes[:, 2]) * 0.5 / frame_w, (boxes[:, 1] + boxes[:, 3]) * 0.5 / frame_h,
                     torch.log(reference / torch.minimum(frame_h, frame_w)).expand(boxes.shape[0])]
    return torch.stack(features, dim=1)


def _normalised_centroids(boxes: Tensor, frame_size: Tensor) -> Tensor:
    centroids = torch.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], dim=1) * 0.5
    return centroids / torch.maximum(frame_size[0], frame_size[1])


def _padded_distances(boxes: Tensor, frame_size: Tensor, k: int) -> Tensor:
    """Squared centroid distances [N, N+k]: self and k padding columns are FAR, so TopK(k) is always valid."""
    centroids = _normalised_centroids(boxes, frame_size)
    n = boxes.shape[0]
    distances = ((centroids.unsqueeze(1) - centroids.unsqueeze(0)) ** 2).sum(-1)
    index = torch.arange(n, device=boxes.device)
    distances = distances + (index.unsqueeze(0) == index.unsqueeze(1)).to(torch.float32) * FAR
    return torch.cat([distances, torch.full((n, k), FAR, device=boxes.device)], dim=1)


def knn_edge_index(boxes: Tensor, frame_size: Tensor, k: int = KNN_K) -> Tensor:
    """PyG edge_index [2, E], edges j -> i for the (up to) k nearest cells j of each cell i."""
    distances = _padded_distances(boxes, frame_size, k)
    values, neighbours = torch.topk(distances, k, dim=1, largest=False)
    valid = values < FAR * 0.5
    targets = torch.arange(boxes.shape[0]).unsqueeze(1).expand_as(neighbours)
    return torch.stack([neighbours[valid], targets[valid]])


def dense_mean_adjacency(boxes: Tensor, frame_size: Tensor, k: int = KNN_K) -> Tensor:
    """Row-normalised kNN adjacency [N, N], built with TopK (constant K) and a one-hot comparison: no scatter."""
    n = boxes.shape[0]
    distances = _padded_distances(boxes, frame_size, k)
    values, neighbours = torch.topk(distances, k, dim=1, largest=False)  # N,k
    valid = (values < FAR * 0.5).to(torch.float32)
    columns = torch.arange(distances.shape[1], device=boxes.device)
    one_hot = (neighbours.unsqueeze(-1) == columns.view(1, 1, -1)).to(torch.float32) * valid.unsqueeze(-1)
    adjacency = one_hot.sum(1)[:, :n]  # N,N
    return adjacency / adjacency.sum(1, keepdim=True).clamp(min=1.0)


class CellGraphNet(nn.Module):
    """GraphSAGE (mean) over the frame's kNN cell graph. Node input: CNN embedding + geometry.

    Its logits add `cnn_weight` times the CNN's own per-crop logits (`cnn_head_weight`, `cnn_head_bias`: a copy of the
    CNN's classifier, read from the embedding part of x): a log-linear pool of the two calibrated models, set after
    training (`pool_with_cnn`, `leukograph train --cnn-blend`); 0 while the GNN trains, and in checkpoints made before
    the blend."""

    def __init__(self, embed_dim: int = EMBED_DIM, hidden: int = 64, layers: int = 2,
                 num_classes: int = NUM_CLASSES, dropout: float = 0.2, geometry: str = "frame") -> None:
        super().__init__()
        if geometry not in GEOMETRY_FEATURES:
            raise ValueError(f"geometry must be one of {sorted(GEOMETRY_FEATURES)}, got {geometry!r}")
        self.geometry = geometry
        self.input = nn.Sequential(nn.Linear(embed_dim + GEOMETRY_FEATURES[geometry], hidden), nn.ReLU())
        self.convs = nn.ModuleList(SAGEConv(hidden, hidden, aggr="mean") for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, num_classes)
        # Calibration (temperature scaling, fitted on validation after training); the served PROBS divide by it.
        self.register_buffer("temperature", torch.ones(()))
        # Then a shift of the flagged classes' (IG, NRBC) log-probabilities, fitted on validation with every class
        # weighing the same (`metrics.fit_flagged_bias`): flags are read for sensitivity, as an analyser's are.
        self.register_buffer("class_bias", torch.zeros(num_classes))
        self.embed_dim = embed_dim
        self.register_buffer("cnn_weight", torch.zeros(()))
        self.register_buffer("cnn_head_weight", torch.zeros(num_classes, embed_dim))
        self.register_buffer("cnn_head_bias", torch.zeros(num_classes))

    def set_cnn_blend(self, classifier: nn.Linear, weight: float) -> None:
        """Add `weight` x the CNN's logits (`classifier`: the CropEmbedder's) to this network's logits."""
        self.cnn_head_weight.copy_(classifier.weight.detach())
        self.cnn_head_bias.copy_(classifier.bias.detach())
        self.cnn_weight.fill_(weight)

    def pool_with_cnn(self, classifier: nn.Linear, blend: float, gnn_temperature: float,
                      cnn_temperature: float) -> float:
        """Pool this network and the CNN (`classifier`: the CropEmbedder's), each calibrated by its own validation
        temperature, log-linearly: (1 - blend) x GNN / T_gnn + blend x CNN / T_cnn. Sets `cnn_weight` and the
        temperature that give exactly that pool (a later refit of the temperature on the pooled logits may replace
        it); returns the weight."""
        weight = cnn_blend_weight(blend, gnn_temperature, cnn_temperature)
        self.set_cnn_blend(classifier, weight)
        self.temperature.fill_(gnn_temperature / (1.0 - blend))
        return weight

    def calibrated_probs(self, logits: Tensor) -> Tensor:
        """The served PROBS: softmax(logits / temperature + class_bias)."""
        return torch.softmax(logits / self.temperature + self.class_bias, dim=1)

    def _with_cnn(self, logits: Tensor, x: Tensor) -> Tensor:
        return logits + self.cnn_weight * F.linear(x[:, :self.embed_dim], self.cnn_head_weight, self.cnn_head_bias)

    def node_inputs(self, embeddings: Tensor, boxes: Tensor, frame_size: Tensor) -> Tensor:
        """Node input x [N, D+G]: the CNN embedding ++ this network's node geometry."""
        return torch.cat([embeddings, geometry_features(boxes, frame_size, self.geometry)], dim=1)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """PyG path. x [N, D+G] (embedding ++ geometry), edge_index [2,E] -> logits [N,C]."""
        h0 = self.input(x)
        h = h0
        for conv in self.convs:
            h = h + F.relu(conv(self.dropout(h), edge_index))
        return self._with_cnn(self.head(torch.cat([h0, h], dim=1)), x)

    def forward_dense(self, x: Tensor, adjacency: Tensor) -> Tensor:
        """The same network with the mean aggregation as a matmul: SAGEConv = lin_l(A @ h) + lin_r(h)."""
        h0 = self.input(x)
        h = h0
        for conv in self.convs:
            h = h + F.relu(conv.lin_l(adjacency @ h) + conv.lin_r(h))
        return self._with_cnn(self.head(torch.cat([h0, h], dim=1)), x)


def cnn_blend_weight(blend: float, gnn_temperature: float, cnn_temperature: float) -> float:
    """`CellGraphNet.cnn_weight` that pools the calibrated models log-linearly, (1 - blend) x GNN + blend x CNN."""
    return blend * gnn_temperature / ((1.0 - blend) * cnn_temperature)


# ---- the two served classifier stages ----------------------------------------------------------------------
def real_rows(rows: Tensor, cell_count: Tensor) -> Tensor:
    """The first CELL_COUNT rows (the cells; the rest is the detector's padding), in-graph: NonZero + Gather."""
    keep = torch.arange(rows.shape[0], device=rows.device) < cell_count.to(torch.int64)
    return rows.index_select(0, torch.nonzero(keep).reshape(-1))


class CropEmbedderStage(nn.Module):
    """Served stage `crop_embedder`: FRAME uint8 [H,W,3], BOXES [R,4], CELL_COUNT int32 [1] -> EMBEDDINGS [N,D] of
    the first N = CELL_COUNT boxes, FRAME_SIZE [2]."""

    def __init__(self, embedder: CropEmbedder) -> None:
        super().__init__()
        self.embedder = served_form(embedder)

    def forward(self, frame: Tensor, boxes: Tensor, cell_count: Tensor) -> tuple[Tensor, Tensor]:
        image = frame.to(torch.float32)  # the uint8 input feeds only this Cast (TensorRT rule)
        embeddings, _ = self.embedder(crop_cells(image, real_rows(boxes, cell_count), size=self.embedder.crop_size))
        frame_size = torch.stack([torch.as_tensor(image.shape[0]), torch.as_tensor(image.shape[1])])
        return embeddings, frame_size.to(torch.float32)


class CellGraphStage(nn.Module):
    """Served stage `cell_graph`: EMBEDDINGS [N,D], BOXES [R,4], FRAME_SIZE, CELL_COUNT -> PROBS [N,C], LABELS int32
    [N]; the graph joins only the first N = CELL_COUNT boxes.

    PROBS are calibrated: softmax(logits / gnn.temperature + gnn.class_bias), both fitted on validation cells; the
    logits include the CNN's own, weighted by gnn.cnn_weight."""

    def __init__(self, gnn: CellGraphNet) -> None:
        super().__init__()
        self.gnn = gnn

    def forward(self, embeddings: Tensor, boxes: Tensor, frame_size: Tensor,
                cell_count: Tensor) -> tuple[Tensor, Tensor]:
        cells = real_rows(boxes, cell_count)
        logits = self.gnn.forward_dense(self.gnn.node_inputs(embeddings, cells, frame_size),
                                        dense_mean_adjacency(cells, frame_size))
        probs = self.gnn.calibrated_probs(logits)
        return probs, torch.argmax(probs, dim=1).to(torch.int32)


# ---- seed-paper baseline -----------------------------------------------------------------------------------
class SeedBaseline(nn.Module):
    """The seed paper's model: whole image resized to 64x64; conv32 -> maxpool -> conv64 -> maxpool -> flatten,
    concatenated with a dense side branch on the raw pixels, then dense 128 and softmax over the 4 WBC classes."""

    def __init__(self, num_classes: int = 4, image_size: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        conv_out = 64 * (((image_size - 2) // 2 - 2) // 2) ** 2
        self.side = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, 64), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(conv_out + 64, 128), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(128, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        """images float [B,3,64,64] in 0..1 -> logits [B,4] (softmax applied by the caller)."""
        return self.head(torch.cat([self.conv(images), self.side(images)], dim=1))
