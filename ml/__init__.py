"""Machine learning: features, labels, training, model registry and predictors.

Never imports Celery or the ``tasks`` package. The entry/exit models arrive with the ML
issue; until then the cluster trades on rule confidence alone.
"""
