"""Domain core: configuration, calendar, bars, signals, risk, orders and broker adapters.

Never imports Celery or the ``tasks`` package.
"""
