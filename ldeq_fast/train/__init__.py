"""Training LDEQ (``ldeq-fast train`` is its command line; ``ldeq_fast.train.train(TrainConfig(...))`` the library
call).  One module per job: ``config`` (TrainConfig, overrides), ``data`` (datasets, epoch order), ``loop``
(Trainer: steps, EMA, loss, checkpoints and resume), ``evaluation`` (NME / FR / AUC), ``plots`` (curves)."""
from ldeq_fast.train.config import (
    DATASETS,
    RESUME_FREE_KEYS,
    TrainConfig,
    config_differences,
    config_from_sources,
    parse_overrides,
)
from ldeq_fast.train.data import CachedDataset, build_dataset, collate, epoch_batches
from ldeq_fast.train.evaluation import evaluate
from ldeq_fast.train.loop import (
    EMA,
    Trainer,
    gaussian_heatmaps,
    landmark_loss,
    solve_summary,
    solve_values,
    train,
    warmup_cosine,
)
from ldeq_fast.train.plots import plot_curves

__all__ = ["DATASETS", "RESUME_FREE_KEYS", "TrainConfig", "config_differences", "config_from_sources",
           "parse_overrides", "CachedDataset", "build_dataset", "collate", "epoch_batches", "evaluate", "EMA",
           "Trainer", "gaussian_heatmaps", "landmark_loss", "solve_summary", "solve_values", "train",
           "warmup_cosine", "plot_curves"]
