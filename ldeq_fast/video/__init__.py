"""Video: RwR tracking, multi-stream batching, conventional smoothing filters, evaluation."""
from ldeq_fast.video.streams import StreamEvent, iter_streams, run_streams
from ldeq_fast.video.tracker import FrameResult, RwRTracker, TrackerConfig

__all__ = ["RwRTracker", "TrackerConfig", "FrameResult", "run_streams", "iter_streams", "StreamEvent"]
