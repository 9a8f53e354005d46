"""Evaluating a frozen encoder: feature extraction and the weighted kNN classifier.

kNN follows Wu et al. (2018) as used by DINO/solo-learn: cosine similarity on L2-normalised features, the top
``k`` neighbours vote for their label with weight ``exp(sim / T)``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .backbones import pool_stage
from .data import decode_image, find_image_column
from .views import eval_transform, image_mode


@dataclass
class Features:
    features: torch.Tensor  # [N, D], float32
    labels: torch.Tensor  # [N], int64
    levels: dict[int, torch.Tensor] | None = None  # level -> [N, C_level], pooled stage features


@torch.no_grad()
def extract_features(model, dataset, *, label_column: str = "label", image_column: str | None = None,
                     batch_size: int = 256, num_workers: int = 0, progress: bool = True,
                     levels: list[int] | None = None) -> Features:
    """Pooled features of every image of a map-style ``dataset`` through a frozen encoder in eval mode.

    ``model`` is a :class:`SiameseModel` (or anything returning ``pooler_output``); images are resized to its
    config's ``image_size`` and normalised with its ``image_mean``/``image_std``. ``levels`` (1-based positions
    in ``hidden_states``) also collects those stages' pooled features, for a multi-level probe.
    """
    config = model.config
    column = find_image_column(list(dataset.column_names), image_column)
    if label_column not in dataset.column_names:
        raise ValueError(f"`label_column` {label_column!r} is not in the dataset; its columns are {dataset.column_names}.")
    transform = eval_transform(config.image_size, config.num_channels, config.image_mean, config.image_std)
    mode = image_mode(config.num_channels)

    def collate(rows):
        images, labels = [], []
        for row in rows:
            image = decode_image(row[column], mode)
            if image is None:
                raise ValueError(f"An evaluation image could not be decoded (label {row[label_column]!r}).")
            images.append(transform(image))
            labels.append(int(row[label_column]))
        return torch.stack(images), torch.tensor(labels)

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    model.eval()
    device = next(model.parameters()).device
    features, labels, level_features = [], [], {level: [] for level in levels or []}
    for pixels, batch_labels in tqdm(loader, desc="features", disable=not progress):
        output = model(pixels.to(device), output_hidden_states=bool(levels))
        features.append(output.pooler_output.float().cpu())
        for level in level_features:
            pooled = pool_stage(output.hidden_states[level - 1], model.backbone, config.ladder_vit_pooling)
            level_features[level].append(pooled.float().cpu())
        labels.append(batch_labels)
    stacked_levels = {level: torch.cat(chunks) for level, chunks in level_features.items()} if levels else None
    return Features(torch.cat(features), torch.cat(labels), stacked_levels)


def knn_classify(train: Features, test_features: torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Predicted labels of ``test_features`` by weighted kNN over ``train``.

    Example:
        >>> bank = Features(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), torch.tensor([0, 0, 1]))
        >>> knn_classify(bank, torch.tensor([[1.0, 0.05], [0.1, 1.0]]), k=1).tolist()
        [0, 1]
    """
    num_classes = num_classes or int(train.labels.max()) + 1
    bank = F.normalize(train.features, dim=1)
    k = min(k, len(bank))
    predictions = []
    for queries in F.normalize(test_features, dim=1).split(chunk_size):
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes)
        votes.scatter_add_(1, train.labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)
