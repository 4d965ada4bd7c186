"""olm.nn: registered building blocks. Importing it registers every built-in component."""

from olm.nn import attention, ffn, norms, position  # noqa: F401  (registration side effects)
from olm.nn.blocks import LM, OutputHead, QKVProjection, TokenEmbedding, TransformerBlock
from olm.nn.structure import Block

__all__ = ["Block", "LM", "OutputHead", "QKVProjection", "TokenEmbedding", "TransformerBlock"]
