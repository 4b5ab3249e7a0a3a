from haystack_integrations.components.monitors.alignment_drift.monitor import AlignmentDriftMonitor, DriftStateError

__all__ = ["AlignmentDriftMonitor", "DriftStateError"]
