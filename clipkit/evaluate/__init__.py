"""Evaluation and scoring: retrieval and classification metrics beside chance, zero-shot and few-shot
runners, CLIPScore / R-precision / best-of-N reranking, and benchmark tasks built from labelled tables."""
from .metrics import classification_metrics, retrieval_metrics
from .runners import EvalResult, eval_linear_probe, eval_retrieval, eval_zeroshot, run_eval
from .scoring import RankedImage, clip_score, r_precision, ranking_json, rerank
from .zeroshot import DEFAULT_TEMPLATES, load_templates, zero_shot_weights

__all__ = ["DEFAULT_TEMPLATES", "EvalResult", "RankedImage", "classification_metrics", "clip_score",
           "eval_linear_probe", "eval_retrieval", "eval_zeroshot", "load_templates", "r_precision", "ranking_json",
           "rerank", "retrieval_metrics", "run_eval", "zero_shot_weights"]
