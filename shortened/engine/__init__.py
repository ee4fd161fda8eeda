"""The pure library (torch, transformers, peft): families, models, calibration, criteria, scoring, prune, retrain, distillation, evaluate, search, export. It never imports Celery, FastAPI or SQL."""
