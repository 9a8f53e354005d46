"""What an encoder learned, as pictures: a nearest-neighbour gallery and a 2-D map of its features.

Both are drawn from features the probe has already extracted, so they cost no second pass over the data. The
gallery's neighbours are the kNN probe's (:func:`~hf_siamese.probing.nearest_neighbours`, the same cosine
similarity). The map is t-SNE (scikit-learn) where installed, else UMAP where installed, else PCA. Drawing needs
matplotlib (the ``pictures`` extra); without it the pictures are skipped and the reason is logged.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .probing import nearest_neighbours

logger = logging.getLogger(__name__)

GALLERY = "knn_gallery.png"
EMBEDDING_MAP = "embedding_map.png"
DENSE_EXAMPLES = "dense_examples.png"
MISMATCH_COLOUR = "#d62728"


@dataclass
class Gallery:
    """The gallery's content: evaluation queries and, per query, its ``k`` nearest training images."""

    queries: torch.Tensor  # [Q] indices into the evaluation split
    neighbours: torch.Tensor  # [Q, k] indices into the training split, nearest first
    similarities: torch.Tensor  # [Q, k] cosine similarities


def gallery_queries(labels: torch.Tensor, per_class: int = 2, seed: int = 0) -> torch.Tensor:
    """``per_class`` evaluation indices of every class, drawn with ``seed``: the same queries for every model."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for label in labels.unique(sorted=True):
        members = (labels == label).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picks)


def find_gallery(bank: torch.Tensor, queries: torch.Tensor, query_indices: torch.Tensor, k: int) -> Gallery:
    """The ``k`` nearest bank rows of each selected query, by the kNN probe's similarity."""
    similarities, neighbours = nearest_neighbours(bank, queries[query_indices], k)
    return Gallery(query_indices, neighbours, similarities)


def embedding_2d(features: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, str]:
    """2-D coordinates of L2-normalised ``features`` and the method's name: t-SNE, else UMAP, else PCA."""
    normalised = F.normalize(features.float(), dim=1)
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        pass
    else:
        tsne = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(features) - 1) / 3), random_state=seed)
        return torch.from_numpy(tsne.fit_transform(normalised.numpy())).float(), "t-SNE"
    try:
        import umap
    except ImportError:
        centred = normalised - normalised.mean(dim=0)
        _, _, basis = torch.linalg.svd(centred, full_matrices=False)
        return centred @ basis[:2].T, "PCA"
    return torch.from_numpy(umap.UMAP(random_state=seed).fit_transform(normalised.numpy())).float(), "UMAP"


def write_pictures(output_dir: Path, bank: torch.Tensor, bank_labels: torch.Tensor, features: torch.Tensor,
                   labels: torch.Tensor, bank_image: Callable[[int], object], image: Callable[[int], object],
                   class_names: Sequence[str], *, k: int = 8, per_class: int = 2, map_points: int = 2000,
                   seed: int = 0) -> dict | None:
    """Draw the gallery and the map into ``output_dir``; what they show, or ``None`` when skipped.

    ``bank``/``bank_labels`` are the training features the kNN probe votes with, ``features``/``labels`` the
    evaluation ones; ``bank_image(i)`` and ``image(i)`` give the images to show.
    """
    pyplot = _pyplot()
    if pyplot is None:
        return None
    gallery = find_gallery(bank, features, gallery_queries(labels, per_class, seed), k)
    _draw_gallery(pyplot, output_dir / GALLERY, gallery, bank_labels, labels, bank_image, image, class_names)
    chosen = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:map_points]
    points, method = embedding_2d(features[chosen], seed)
    _draw_map(pyplot, output_dir / EMBEDDING_MAP, points, labels[chosen], class_names, method)
    return {"gallery": GALLERY, "embedding_map": EMBEDDING_MAP, "map_method": method, "map_points": len(chosen),
            "gallery_queries": gallery.queries.tolist(), "gallery_neighbours": gallery.neighbours.tolist()}


def write_dense_examples(output_dir: Path, images: Sequence, labels: torch.Tensor, predictions: torch.Tensor,
                         id2label: dict[int, str], title: str) -> dict | None:
    """A few evaluation scenes, their label maps and the dense probe's predictions side by side; what the picture
    shows, or ``None`` when skipped."""
    pyplot = _pyplot()
    if pyplot is None:
        return None
    from matplotlib.colors import ListedColormap

    colours = ListedColormap(["black", *pyplot.get_cmap("tab20").colors[: len(id2label) - 1]])
    figure, axes = pyplot.subplots(len(images), 3, figsize=(4.5, 1.5 * len(images)), squeeze=False)
    for row, (image, truth, predicted) in enumerate(zip(images, labels, predictions)):
        _show(axes[row, 0], image, "scene" if row == 0 else "", "black")
        for column, label_map, name in ((1, truth, "truth"), (2, predicted, "prediction")):
            _show(axes[row, column], label_map.numpy(), name if row == 0 else "", "black", colours=colours,
                  num_labels=len(id2label))
    shown = sorted({int(v) for v in torch.cat([labels.flatten(), predictions.flatten()]).tolist()} - {255})
    handles = [pyplot.Rectangle((0, 0), 1, 1, color=colours(label)) for label in shown]
    figure.legend(handles, [id2label[label] for label in shown], fontsize=5, loc="lower center", ncol=4)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 0.96))
    figure.savefig(output_dir / DENSE_EXAMPLES, dpi=100)
    pyplot.close(figure)
    return {"examples": DENSE_EXAMPLES, "title": title, "count": len(images)}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        logger.warning("Pictures skipped: matplotlib is not installed (pip install 'hf_siamese[pictures]').")
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as pyplot

    return pyplot


def _draw_gallery(pyplot, path: Path, gallery: Gallery, bank_labels: torch.Tensor, labels: torch.Tensor,
                  bank_image: Callable, image: Callable, class_names: Sequence[str]) -> None:
    """One row per query: the query, then its neighbours; a neighbour of another class is framed and titled red."""
    rows, k = gallery.neighbours.shape
    figure, axes = pyplot.subplots(rows, k + 1, figsize=(1.1 * (k + 1), 1.25 * rows), squeeze=False)
    for row, query in enumerate(gallery.queries.tolist()):
        _show(axes[row, 0], image(query), f"query: {class_names[labels[query]]}", "black", bold=True)
        for column, neighbour in enumerate(gallery.neighbours[row].tolist(), start=1):
            label = bank_labels[neighbour]
            colour = "black" if label == labels[query] else MISMATCH_COLOUR
            _show(axes[row, column], bank_image(neighbour), class_names[label], colour)
    figure.suptitle(f"{k} nearest training images of each query (cosine similarity, as the kNN probe); "
                    "red: another class", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / figure.get_figheight()))  # 0.3 inch above the grid for the title
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _show(axis, picture, title: str, colour: str, bold: bool = False, colours=None, num_labels: int = 0) -> None:
    if colours is not None:  # a label map: one fixed colour per class
        axis.imshow(picture, cmap=colours, vmin=0, vmax=num_labels - 1, interpolation="nearest")
    elif getattr(picture, "mode", "") == "L":  # grey levels as they are, not stretched per image
        axis.imshow(picture, cmap="gray", vmin=0, vmax=255)
    else:
        axis.imshow(picture.convert("RGB") if hasattr(picture, "convert") else picture)
    axis.set_title(title, fontsize=6, color=colour, fontweight="bold" if bold else "normal")
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(2 if colour != "black" else 0.5)


def _draw_map(pyplot, path: Path, points: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
              method: str) -> None:
    figure, axis = pyplot.subplots(figsize=(6.5, 5.5))
    colours = pyplot.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for label in labels.unique(sorted=True).tolist():
        mine = points[labels == label]
        axis.scatter(mine[:, 0], mine[:, 1], s=3, color=colours(label % colours.N), label=class_names[label])
    axis.set_title(f"{method} of {len(points)} evaluation features", fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.legend(fontsize=6, markerscale=3, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
