from haystack_integrations.components.rankers.colpali.ranker import ColPaliRanker

__all__ = ["ColPaliRanker"]
