from haystack_integrations.pipelines.multimodal_rag.loader import load_pipeline, rewrite_pipeline_dict, shipped_pipeline
from haystack_integrations.pipelines.multimodal_rag.pipeline import MultimodalRAGPipeline

__all__ = ["MultimodalRAGPipeline", "load_pipeline", "rewrite_pipeline_dict", "shipped_pipeline"]
