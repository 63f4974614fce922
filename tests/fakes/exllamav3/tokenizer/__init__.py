from .tokenizer import Tokenizer
from .mm_embedding import MMEmbedding
