from haystack_integrations.components.converters.multimodal.file_to_document import (
    MultimodalFileToDocument,
    SourceConversionError,
)

__all__ = ["MultimodalFileToDocument", "SourceConversionError"]
