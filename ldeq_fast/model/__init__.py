from ldeq_fast.model.ldeq import LDEQ, LDEQOutput, init_weights_like_published
from ldeq_fast.model.published import load_published, published_args_to_config

__all__ = ["LDEQ", "LDEQOutput", "init_weights_like_published", "load_published", "published_args_to_config"]
