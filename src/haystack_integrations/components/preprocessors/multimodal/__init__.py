from haystack_integrations.components.preprocessors.multimodal.page_quality_filter import PageQualityFilter

__all__ = ["PageQualityFilter"]
