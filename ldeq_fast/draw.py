"""Drawing landmarks on images (annotated photos and video frames)."""
from __future__ import annotations

import cv2
import numpy as np

BOX_COLOURS = {"haar": (80, 160, 255), "yunet": (80, 160, 255), "given": (255, 200, 0), "landmarks": (0, 200, 255)}


def draw_landmarks(image: np.ndarray, landmarks, uncertainty=None, box=None, box_source: str = "",
                   label: str | None = None) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 RGB with the landmarks (K, 2) as dots, each landmark's uncertainty
    (K,) (image pixels) as a circle of that radius, the crop box and a label.  ``landmarks=None``: a frame
    without a face ("no face" is written on it)."""
    out = np.array(image, dtype=np.uint8, copy=True, order="C")
    H, W = out.shape[:2]
    unit = max(1, round(min(H, W) / 320))         # line width / dot radius that stays visible on large frames
    if box is not None:
        b = np.asarray(box, np.float64)
        if np.isfinite(b).all():
            cv2.rectangle(out, (int(round(b[0])), int(round(b[1]))), (int(round(b[2])), int(round(b[3]))),
                          BOX_COLOURS.get(box_source, (255, 255, 255)), unit)
    if landmarks is None:
        cv2.putText(out, "no face", (6 * unit, 18 * unit), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * unit, (255, 64, 64), unit)
    else:
        pts = np.asarray(landmarks, np.float64)
        if uncertainty is not None:     # translucent circles of radius = the spread: legible where they overlap
            layer = out.copy()
            for (x, y), u in zip(pts, np.asarray(uncertainty, np.float64)):
                r = int(round(u))
                if r > unit:
                    cv2.circle(layer, (int(round(x)), int(round(y))), r, (255, 170, 0), 1, cv2.LINE_AA)
            cv2.addWeighted(layer, 0.35, out, 0.65, 0, dst=out)
        for x, y in pts:
            cv2.circle(out, (int(round(x)), int(round(y))), unit, (0, 255, 0), -1, cv2.LINE_AA)
    if label:
        cv2.putText(out, label, (6 * unit, H - 6 * unit), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * unit, (255, 255, 255), unit)
    return out
