"""Private internals of multimodal-rag-haystack, shared by its components. Not a public API."""

from haystack_integrations.common.multimodal_rag.qdrant_local import share_embedded_qdrant_document_stores

# Several QdrantDocumentStores (and our QdrantMultiVectorStores) on one embedded folder must share one
# client: Qdrant's local mode locks the folder per client. See qdrant_local.py; opt out with
# MULTIMODAL_RAG_SHARE_EMBEDDED_QDRANT=0.
share_embedded_qdrant_document_stores()
