"""Model definitions: teacher, student, segmentation net and the PFADSeg modules."""
from .model import AnomalyModel, ModelConfig, image_scores
from .teacher import TEACHERS, TeacherWeightsError, build_teacher

__all__ = ["AnomalyModel", "ModelConfig", "image_scores", "TEACHERS", "TeacherWeightsError", "build_teacher"]
