"""The documented building blocks: LM, TransformerBlock, OutputHead, QKVProjection."""

from olm.nn.blocks.embedding import TokenEmbedding
from olm.nn.blocks.linear_projections import QKVProjection
from olm.nn.blocks.lm import LM
from olm.nn.blocks.output_head import OutputHead
from olm.nn.blocks.transformer_block import TransformerBlock

__all__ = ["LM", "OutputHead", "QKVProjection", "TransformerBlock", "TokenEmbedding"]
