from haystack_integrations.components.builders.multimodal.chat_prompt_builder import (
    Citation,
    MultimodalChatPromptBuilder,
)

__all__ = ["Citation", "MultimodalChatPromptBuilder"]
