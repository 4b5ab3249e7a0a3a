from haystack_integrations.common.multimodal_rag.multivector import MultiVectorStore, MultiVectorStoreError
from haystack_integrations.document_stores.multivector.in_memory import InMemoryMultiVectorStore
from haystack_integrations.document_stores.multivector.qdrant import QdrantMultiVectorStore

__all__ = ["InMemoryMultiVectorStore", "MultiVectorStore", "MultiVectorStoreError", "QdrantMultiVectorStore"]
