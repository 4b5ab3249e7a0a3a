from haystack_integrations.components.builders.multimodal.chat_prompt_builder import MultimodalChatPromptBuilder

__all__ = ["MultimodalChatPromptBuilder"]
