from haystack_integrations.common.multimodal_rag.errors import DriftStateError
from haystack_integrations.components.monitors.alignment_drift.monitor import AlignmentDriftMonitor

__all__ = ["AlignmentDriftMonitor", "DriftStateError"]
