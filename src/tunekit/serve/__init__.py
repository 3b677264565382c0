"""`tunekit serve`: an OpenAI-compatible server of one base model and many adapters.

engine.py (the loop) drives scheduler.py (who runs next), runner.py (one forward over many sequences, kv_cache.py,
lora_batch.py), sampling.py and structured.py; adapters.py reads adapter folders; api.py, protocol.py, security.py,
metrics.py and embeddings.py are the HTTP face; server.py starts it all.
"""
