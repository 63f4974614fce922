from .config import Config
from .model import Model
