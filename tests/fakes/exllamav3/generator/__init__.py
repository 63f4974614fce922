from .generator import Generator
from .job import Job
from .async_generator import AsyncGenerator, AsyncJob
from .filter import Filter, FormatronFilter, LLGuidanceFilter
