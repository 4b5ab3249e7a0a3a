"""Private: see haystack_integrations.common.multimodal_rag."""
