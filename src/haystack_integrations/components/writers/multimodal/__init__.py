from haystack_integrations.components.writers.multimodal.stale_document_pruner import StaleDocumentPruner

__all__ = ["StaleDocumentPruner"]
