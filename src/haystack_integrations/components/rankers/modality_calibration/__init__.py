from haystack_integrations.components.rankers.modality_calibration.calibrator import ModalityScoreCalibrator

__all__ = ["ModalityScoreCalibrator"]
