"""MAR refinement: data, losses, trainer, the two-stage pipeline, evaluation and the report."""
from .data import DataError, read_texts, split_heldout, teacher_generated_texts, tokenize_and_pack
from .evaluate import agreement, load_multiple_choice, perplexity, score_multiple_choice
from .losses import feature_loss, kl_terms, sbds_logit_loss
from .pipeline import PRESETS, RefineConfig, RefineError, run_refine
from .trainer import TrainConfig, Trainer, TrainingDiverged

__all__ = ["RefineConfig", "PRESETS", "RefineError", "run_refine", "TrainConfig", "Trainer", "TrainingDiverged", "DataError",
           "read_texts", "tokenize_and_pack", "split_heldout", "teacher_generated_texts", "sbds_logit_loss",
           "kl_terms", "feature_loss", "perplexity", "agreement", "load_multiple_choice", "score_multiple_choice"]
