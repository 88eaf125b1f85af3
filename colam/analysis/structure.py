"""What a C x C soft-label matrix says about the classes (COLAM paper, Sec. 5.2): the mass row c (the label of class c)
puts on class j != c is the model's view of how alike c and j are."""

from __future__ import annotations

import numpy as np

from colam.errors import ColamError


def nearest_classes(soft_labels: np.ndarray, count: int) -> list[list[tuple[int, float]]]:
    """For each class c, the `count` other classes its soft label puts most mass on, as (class, mass) pairs, largest
    first; ties go to the lower class index."""
    matrix = np.asarray(soft_labels, dtype=np.float64)
    # a stable sort on -mass keeps the index order among equal masses
    ranked = [[j for j in np.argsort(-row, kind="stable") if j != c][:count] for c, row in enumerate(matrix)]
    return [[(int(j), float(matrix[c, j])) for j in row] for c, row in enumerate(ranked)]


def similarity(soft_labels: np.ndarray) -> np.ndarray:
    """Symmetric class similarity: (S[i, j] + S[j, i]) / 2 off the diagonal, 0 on it."""
    matrix = np.asarray(soft_labels, dtype=np.float64)
    sym = (matrix + matrix.T) / 2
    np.fill_diagonal(sym, 0.0)
    return sym


def most_similar_pair(soft_labels: np.ndarray) -> tuple[int, int, float]:
    """The two classes a < b of the largest similarity, and that similarity; ties go to the lowest (a, b)."""
    sym = similarity(soft_labels)
    upper = np.triu_indices(len(sym), k=1)
    best = int(np.argmax(sym[upper]))  # argmax takes the first maximum
    return int(upper[0][best]), int(upper[1][best]), float(sym[upper][best])


def default_classes(soft_labels: np.ndarray) -> list[int]:
    """The paper's choice of three classes, made from the soft labels: the two most similar classes (a, b), then the
    class least similar to both (smallest similarity(a, c) + similarity(b, c)); ties go to the lower index."""
    if len(soft_labels) < 3:
        raise ColamError(f"--classes: the geometry needs 3 classes, the data has {len(soft_labels)}")
    sym = similarity(soft_labels)
    a, b, _ = most_similar_pair(soft_labels)
    distance_to_pair = sym[a] + sym[b]
    distance_to_pair[[a, b]] = np.inf
    return [a, b, int(np.argmin(distance_to_pair))]


def resolve_classes(chosen: list, class_names: list[str], key: str = "analysis.classes") -> list[int]:
    """Class indices from names (strings) or indices (integers); exactly three, all different."""
    if len(chosen) != 3:
        raise ColamError(f"{key}: give exactly 3 classes (names or indices), got {len(chosen)}")
    indices = []
    for item in chosen:
        if isinstance(item, bool):
            raise ColamError(f"{key}: {item!r} is neither a class name nor an index")
        if isinstance(item, int):
            if not 0 <= item < len(class_names):
                raise ColamError(f"{key}: class index {item} is out of range for {len(class_names)} classes")
            indices.append(item)
        elif str(item) in class_names:
            indices.append(class_names.index(str(item)))
        else:
            shown = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
            raise ColamError(f"{key}: no class named {item!r} (classes: {shown})")
    if len(set(indices)) != 3:
        raise ColamError(f"{key}: {chosen} names a class twice")
    return indices
