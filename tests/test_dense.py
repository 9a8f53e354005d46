import torch
import torch.nn.functional as F

from hf_siamese.dense import cell_centres, dense_cosine_loss, matched_cells


def geometry(top, left, height, width, flipped=False):
    return torch.tensor([[top, left, height, width, float(flipped)]])


def test_identical_views_match_each_cell_to_itself():
    same = geometry(0.1, 0.2, 0.5, 0.5)
    index, valid = matched_cells(same, same, 4, 4)
    assert valid.all() and index.tolist() == [list(range(16))]


def test_known_boxes_give_the_right_cell_pairs():
    # Source: the left half of the image; target: the whole image. Source cell (row r, col c) of a 2x2 grid sits
    # at image x = (c + 0.5) / 4, y = (r + 0.5) / 2 -> target 4x4 cell (row 2r + 1, col c).
    index, valid = matched_cells(geometry(0.0, 0.0, 1.0, 0.5), geometry(0.0, 0.0, 1.0, 1.0), 2, 4)
    assert valid.all()
    assert index.tolist() == [[1 * 4 + 0, 1 * 4 + 1, 3 * 4 + 0, 3 * 4 + 1]]


def test_a_flipped_view_mirrors_the_columns():
    whole = geometry(0.0, 0.0, 1.0, 1.0)
    index, valid = matched_cells(whole, geometry(0.0, 0.0, 1.0, 1.0, flipped=True), 2, 2)
    assert valid.all() and index.tolist() == [[1, 0, 3, 2]]
    # Source flipped, target not: the same mirroring from the other side.
    index, _ = matched_cells(geometry(0.0, 0.0, 1.0, 1.0, flipped=True), whole, 2, 2)
    assert index.tolist() == [[1, 0, 3, 2]]


def test_cells_outside_the_overlap_are_ignored():
    # Source: the whole image; target: its right half. Only the source's right column lies inside the target.
    index, valid = matched_cells(geometry(0.0, 0.0, 1.0, 1.0), geometry(0.0, 0.5, 1.0, 0.5), 2, 2)
    assert valid.tolist() == [[False, True, False, True]]
    # Source column 1 is at image x = 0.75, target x = (0.75 - 0.5) / 0.5 = 0.5: target column 1.
    assert index[valid].tolist() == [1, 3]


def test_dense_loss_is_zero_for_matching_cells_and_ignores_invalid_ones():
    targets = F.normalize(torch.randn(1, 4, 8), dim=-1)
    index = torch.tensor([[3, 2, 1, 0]])
    predictions = targets[:, [3, 2, 1, 0]] * 5  # scale does not matter to a cosine
    assert dense_cosine_loss(predictions, targets, index, torch.ones(1, 4, dtype=torch.bool)).item() < 1e-6
    wrong = predictions.clone()
    wrong[0, 0] = -wrong[0, 0]  # opposite direction: 2 - 2 * (-1) = 4 for that cell
    valid = torch.tensor([[True, True, False, False]])
    assert abs(dense_cosine_loss(wrong, targets, index, valid).item() - (4 + 0) / 2) < 1e-5
    none = torch.zeros(1, 4, dtype=torch.bool)
    assert dense_cosine_loss(wrong.requires_grad_(), targets, index, none).item() == 0.0


def test_cell_centres_are_row_major():
    assert cell_centres(2).tolist() == [[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]]
