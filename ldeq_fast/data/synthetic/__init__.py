"""Procedurally drawn faces with 98 landmarks in the WFLW layout, as still images and as videos.

Every face is built in a canonical frame (x to the image right, y down, face centre at the origin, half
face width ~0.9), bent by a cylinder model for pseudo-yaw, then placed by a similarity transform
(rotation, scale, translation).  The drawn shapes go through the same mapping as the landmarks, so each
landmark sits on visible structure: jaw outline, brow polygons, eyelids, iris centres, nostril line, lips.

"left" means image left (WFLW convention): contour point 0, brow 33-41, eye 60-67 and pupil 96 are on the
image left.  The right-side features are the mirrored left-side construction placed at the flip partners
of ``WFLW98.flip_permutation()``.

Everything is deterministic: a face is a ``SyntheticFaceParams`` (which carries its own seeds for the
background clutter and the sensor noise), ``sample_params`` draws one from a numpy Generator, and
``SyntheticFaces`` seeds item i with ``np.random.default_rng((seed, i))``.

The package is split by job: ``params`` (the face parameters), ``geometry`` (landmarks and shapes in
canonical units, projection to pixels), ``sampling`` (drawing parameters), ``rendering`` (drawing an image),
``dataset`` (``SyntheticFaces``) and ``video`` (``make_video``).
"""

from ldeq_fast.data.synthetic.dataset import SyntheticFaces
from ldeq_fast.data.synthetic.geometry import face_landmarks
from ldeq_fast.data.synthetic.params import DIFFICULTIES, N_LANDMARKS, Occluder, SyntheticFaceParams
from ldeq_fast.data.synthetic.rendering import render_face
from ldeq_fast.data.synthetic.sampling import sample_params
from ldeq_fast.data.synthetic.video import SyntheticVideo, make_video

__all__ = [
    "DIFFICULTIES",
    "N_LANDMARKS",
    "Occluder",
    "SyntheticFaceParams",
    "sample_params",
    "face_landmarks",
    "render_face",
    "SyntheticFaces",
    "SyntheticVideo",
    "make_video",
]
