"""
CPU fake of exllamav3 1.6.5 for tests (see NOTES.md). Install it as `exllamav3` with
tests/fakes/exllamav3_model.py:installed_fake_exllamav3(); never import it next to the real package.

Same top-level names as the real exllamav3/__init__.py (which first imports torch and JIT-builds the CUDA
extension; the fake needs neither).
"""

from .model.config import Config
from .model.model import Model
from .tokenizer import Tokenizer, MMEmbedding
from .cache import Cache, CacheLayer_fp16, CacheLayer_quant
from .generator import Generator, Job, AsyncGenerator, AsyncJob, Filter, FormatronFilter, LLGuidanceFilter
from .generator.sampler import *  # noqa: F401,F403

FAKE_EXLLAMAV3 = True
