from haystack_integrations.components.generators.local_vlm.chat_generator import LocalVLMChatGenerator

__all__ = ["LocalVLMChatGenerator"]
