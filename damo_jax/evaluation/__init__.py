"""Evaluation: the COCO evaluator over a dataset split (``evaluator``) and COCO metrics (``coco``)."""
