from haystack_integrations.components.embedders.colpali.document_embedder import ColPaliDocumentEmbedder
from haystack_integrations.components.embedders.colpali.text_embedder import ColPaliTextEmbedder

__all__ = ["ColPaliDocumentEmbedder", "ColPaliTextEmbedder"]
