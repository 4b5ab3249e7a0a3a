from haystack_integrations.common.multimodal_rag.errors import ConversionError
from haystack_integrations.components.converters.multimodal.file_to_document import MultimodalFileToDocument

__all__ = ["ConversionError", "MultimodalFileToDocument"]
