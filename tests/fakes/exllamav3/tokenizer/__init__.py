from .mm_embedding import MMEmbedding
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "MMEmbedding"]
