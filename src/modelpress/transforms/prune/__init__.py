"""Structured pruning: whole channels (CNNs, MLPs), FFN neurons, attention heads and blocks (transformers)
removed so that the modules truly shrink; recorded for `mp.load` and, for Hugging Face models, written into
the config so `from_pretrained` rebuilds the smaller model."""
from .channels import ChannelPruneConfig, prune_channels_

__all__ = ["ChannelPruneConfig", "prune_channels_"]
from .transformer import TransformerPruneConfig, prune_transformer_

__all__ += ["TransformerPruneConfig", "prune_transformer_"]
