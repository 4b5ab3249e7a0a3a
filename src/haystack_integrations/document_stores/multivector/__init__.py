from haystack_integrations.common.multimodal_rag.errors import MultiVectorStoreError
from haystack_integrations.document_stores.multivector.in_memory import InMemoryMultiVectorStore
from haystack_integrations.document_stores.multivector.protocol import MultiVectorStore
from haystack_integrations.document_stores.multivector.qdrant import QdrantMultiVectorStore
from haystack_integrations.document_stores.multivector.qdrant_sharing import share_embedded_qdrant_document_stores
from haystack_integrations.document_stores.multivector.sqlite import SQLiteMultiVectorStore

__all__ = [
    "InMemoryMultiVectorStore",
    "MultiVectorStore",
    "MultiVectorStoreError",
    "QdrantMultiVectorStore",
    "SQLiteMultiVectorStore",
    "share_embedded_qdrant_document_stores",
]
