"""What a C x C soft-label matrix says about the classes (COLAM paper, Sec. 5.2).

Row c of the matrix is the soft label of class c. Mass that row c puts on class j != c is the
model's view of how alike c and j are: COLAM's labels put more mass on similar classes (on
CIFAR-100, "palm tree" and "pine tree"), label smoothing's spread it evenly.
"""

from __future__ import annotations

import numpy as np

from colam.errors import ColamError


def nearest_classes(soft_labels: np.ndarray, count: int) -> list[list[tuple[int, float]]]:
    """For each class c, the `count` other classes its soft label puts most mass on, as
    (class, mass) pairs, largest first; ties go to the lower class index."""
    matrix = np.asarray(soft_labels, dtype=np.float64)
    classes = len(matrix)
    count = min(count, classes - 1)
    found = []
    for c in range(classes):
        others = [j for j in range(classes) if j != c]
        # a stable sort on -mass keeps the index order among equal masses
        ranked = sorted(others, key=lambda j: -matrix[c, j])[:count]
        found.append([(j, float(matrix[c, j])) for j in ranked])
    return found


def similarity(soft_labels: np.ndarray) -> np.ndarray:
    """Symmetric class similarity: (S[i, j] + S[j, i]) / 2 off the diagonal, 0 on it."""
    matrix = np.asarray(soft_labels, dtype=np.float64)
    sym = (matrix + matrix.T) / 2
    np.fill_diagonal(sym, 0.0)
    return sym


def default_classes(soft_labels: np.ndarray) -> list[int]:
    """The paper's choice of three classes, made from the soft labels: the two most similar classes
    (a, b), then the class least similar to both (smallest similarity(a, c) + similarity(b, c));
    ties go to the lower index."""
    sym = similarity(soft_labels)
    if len(sym) < 3:
        raise ColamError(f"--classes: the geometry needs 3 classes, the data has {len(sym)}")
    upper = np.triu_indices(len(sym), k=1)
    best = int(np.argmax(sym[upper]))  # argmax takes the first maximum: the lowest (a, b)
    a, b = int(upper[0][best]), int(upper[1][best])
    distance_to_pair = sym[a] + sym[b]
    distance_to_pair[[a, b]] = np.inf
    c = int(np.argmin(distance_to_pair))
    return [a, b, c]


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
