"""Test support for multimodal-rag-haystack: tiny random-weight checkpoints built locally. Never imported at runtime."""
