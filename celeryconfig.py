"""Celery configuration, read by ``tasks.app`` and by the default loader of ``celery call``.

Everything comes from the one Settings object (``TRADING_*``). JSON only, explicit routes:
inference and training on ``gpu``; ticks, decisions, orders, EOD and the kill switch on
``exec``.
"""

from core.config import get_settings

_settings = get_settings()

broker_url = _settings.redis_url
result_backend = _settings.redis_url
broker_connection_retry_on_startup = True
broker_connection_timeout = 5
broker_transport_options = {
    # An unacked exec task (worker killed mid-order) comes back after this many seconds.
    "visibility_timeout": 120,
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
}
redis_socket_timeout = 10
redis_socket_connect_timeout = 5

# TLS: a rediss:// URL verifies the server's certificate (TRADING_REDIS_CA_FILE: a private CA)
if broker_url.startswith("rediss://") and "ssl_cert_reqs" not in broker_url:
    import ssl as _ssl

    broker_use_ssl = {"ssl_cert_reqs": _ssl.CERT_REQUIRED}
    if _settings.redis_ca_file:
        broker_use_ssl["ssl_ca_certs"] = str(_settings.redis_ca_file)
    redis_backend_use_ssl = dict(broker_use_ssl)

# JSON only: a pickled message is refused.
accept_content = ["json"]
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
result_accept_content = ["json"]

# Results are off; a chain passes each result in the next message, not through the backend.
task_ignore_result = True
result_expires = 3600

task_routes = {
    "tasks.score": {"queue": "gpu"},
    "tasks.train_models": {"queue": "gpu"},
    "tasks.tick": {"queue": "exec"},
    "tasks.decide": {"queue": "exec"},
    "tasks.submit_order": {"queue": "exec"},
    "tasks.close_position": {"queue": "exec"},
    "tasks.eod_close": {"queue": "exec"},
    "tasks.flatten_all": {"queue": "exec"},
    "tasks.resume_trading": {"queue": "exec"},
    "tasks.reconcile": {"queue": "exec"},
    "tasks.ping": {"queue": "exec"},
}
task_default_queue = "exec"
task_create_missing_queues = True

# At-least-once for the exec side: ack after the task ran; requeue if the worker dies.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_soft_time_limit = _settings.task_soft_time_limit_s
task_time_limit = _settings.task_time_limit_s

worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = False
# crontab entries (the nightly training) follow New York time; messages stay in UTC
timezone = "America/New_York"
enable_utc = True

imports = ("tasks.trading",)
