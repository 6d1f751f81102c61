"""Landmark layouts: horizontal-flip index pairs, inter-ocular indices and regions.

These are facts of the public annotation conventions (WFLW 98-point, 300W 68-point).  After mirroring
an image, x -> 1 - x and the points of each flip pair swap indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Layout:
    name: str
    n: int
    flip_pairs: tuple
    interocular: tuple
    regions: dict = field(default_factory=dict)

    def flip_permutation(self) -> list[int]:
        """perm such that flipped_points = mirrored_points[perm]."""
        perm = list(range(self.n))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm


WFLW98 = Layout(
    name="wflw98",
    n=98,
    flip_pairs=(
        (0, 32),
        (1, 31),
        (2, 30),
        (3, 29),
        (4, 28),
        (5, 27),
        (6, 26),
        (7, 25),
        (8, 24),
        (9, 23),
        (10, 22),
        (11, 21),
        (12, 20),
        (13, 19),
        (14, 18),
        (15, 17),
        (33, 46),
        (34, 45),
        (35, 44),
        (36, 43),
        (37, 42),
        (38, 50),
        (39, 49),
        (40, 48),
        (41, 47),
        (60, 72),
        (61, 71),
        (62, 70),
        (63, 69),
        (64, 68),
        (65, 75),
        (66, 74),
        (67, 73),
        (55, 59),
        (56, 58),
        (76, 82),
        (77, 81),
        (78, 80),
        (87, 83),
        (86, 84),
        (88, 92),
        (89, 91),
        (95, 93),
        (96, 97),
    ),
    interocular=(60, 72),
    # inclusive index ranges
    regions={
        "contour": (0, 32),
        "left_brow": (33, 41),
        "right_brow": (42, 50),
        "nose": (51, 59),
        "left_eye": (60, 67),
        "right_eye": (68, 75),
        "outer_mouth": (76, 87),
        "inner_mouth": (88, 95),
        "pupils": (96, 97),
    },
)

W300_68 = Layout(
    name="300w68",
    n=68,
    flip_pairs=(
        (0, 16),
        (1, 15),
        (2, 14),
        (3, 13),
        (4, 12),
        (5, 11),
        (6, 10),
        (7, 9),
        (17, 26),
        (18, 25),
        (19, 24),
        (20, 23),
        (21, 22),
        (31, 35),
        (32, 34),
        (36, 45),
        (37, 44),
        (38, 43),
        (39, 42),
        (40, 47),
        (41, 46),
        (48, 54),
        (49, 53),
        (50, 52),
        (55, 59),
        (56, 58),
        (60, 64),
        (61, 63),
        (65, 67),
    ),
    interocular=(36, 45),
)

LAYOUTS = {98: WFLW98, 68: W300_68}


def layout_for(n_keypoints: int) -> Layout:
    if n_keypoints not in LAYOUTS:
        raise ValueError(
            f"no landmark layout with flip pairs for {n_keypoints} points (known: {sorted(LAYOUTS)})"
        )
    return LAYOUTS[n_keypoints]
