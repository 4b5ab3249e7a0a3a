from haystack_integrations.components.retrievers.oversampling.retriever import FilterAwareRetriever

__all__ = ["FilterAwareRetriever"]
