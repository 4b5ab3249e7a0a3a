from haystack_integrations.common.multimodal_rag.multivector import MultiVectorStore, MultiVectorStoreError
from haystack_integrations.document_stores.multivector.in_memory import InMemoryMultiVectorStore
from haystack_integrations.document_stores.multivector.qdrant import QdrantMultiVectorStore
from haystack_integrations.document_stores.multivector.sqlite import SQLiteMultiVectorStore

__all__ = [
    "InMemoryMultiVectorStore",
    "MultiVectorStore",
    "MultiVectorStoreError",
    "QdrantMultiVectorStore",
    "SQLiteMultiVectorStore",
]
