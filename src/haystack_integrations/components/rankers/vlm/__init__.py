from haystack_integrations.components.rankers.vlm.ranker import VisionLanguageRanker

__all__ = ["VisionLanguageRanker"]
