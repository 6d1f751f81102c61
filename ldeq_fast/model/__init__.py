from ldeq_fast.model.ldeq import LDEQ, LDEQOutput, init_weights_like_published
from ldeq_fast.model.loading import load_model
from ldeq_fast.model.published import load_published, published_args_to_config
from ldeq_fast.model.weights import load_weights, save_weights

__all__ = ["LDEQ", "LDEQOutput", "init_weights_like_published", "load_model", "load_published", "published_args_to_config", "load_weights",
           "save_weights"]
