from haystack_integrations.common.multimodal_rag.errors import DriftStateError
from haystack_integrations.components.monitors.alignment_drift.monitor import AlignmentDriftMonitor, DriftReport

__all__ = ["AlignmentDriftMonitor", "DriftReport", "DriftStateError"]
