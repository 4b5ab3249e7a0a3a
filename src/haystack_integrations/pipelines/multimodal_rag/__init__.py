from haystack_integrations.pipelines.multimodal_rag.loader import load_pipeline, rewrite_pipeline_dict

__all__ = ["load_pipeline", "rewrite_pipeline_dict"]
