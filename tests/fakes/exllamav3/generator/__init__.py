from .async_generator import AsyncGenerator, AsyncJob
from .filter import Filter, FormatronFilter, LLGuidanceFilter
from .generator import Generator
from .job import Job

__all__ = ["Generator", "Job", "AsyncGenerator", "AsyncJob", "Filter", "FormatronFilter", "LLGuidanceFilter"]
