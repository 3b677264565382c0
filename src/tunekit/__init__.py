"""tunekit: adapt an open LLM to your own data on your own hardware.

    import tunekit
    result = tunekit.train("configs/demo-lora.yaml")
"""

from .api import chat, compare, demo, evaluate, generate, merge, plan, train
from .config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "chat", "compare", "demo", "evaluate", "generate", "load_config", "merge", "plan", "train"]
