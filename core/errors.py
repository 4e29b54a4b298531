"""The project's one error hierarchy.

Branches are chosen by what the caller does::

    TradingError
     ├── ConfigError              refuse to start (bad setting, bad data folder)
     │    └── BarDataError        a bar file that cannot be used at all
     ├── TransientError           retry with backoff
     │    ├── BrokerUnavailable
     │    ├── RateLimited
     │    ├── StaleMarketData
     │    └── OrderInFlight       another worker holds the order's lock right now
     ├── OrderRejected            record, never retry
     │    ├── InsufficientBuyingPower
     │    └── DuplicateOrder
     └── TradingHalted            kill switch engaged: no new entries

"Risk says no" and "no signal" are return values, not exceptions.
"""


class TradingError(Exception):
    """Root of every error raised on purpose by this project."""


class ConfigError(TradingError):
    """A setting or an input folder is unusable; the process must not start."""


class BarDataError(ConfigError):
    """A bar file is missing, unreadable or has no usable rows."""


class TransientError(TradingError):
    """A failure that may succeed when retried later."""


class BrokerUnavailable(TransientError):
    """The broker could not be reached or answered with a server error."""


class RateLimited(TransientError):
    """The broker or data vendor asked us to slow down."""


class StaleMarketData(TransientError):
    """The newest bar is older than allowed."""


class FillsPending(TransientError):
    """Scoring started before the tick applied its bar's fills, and they did not come."""


class OrderInFlight(TransientError):
    """Another worker is submitting the same client_order_id; look again shortly."""


class OrderRejected(TradingError):
    """The broker refused an order; do not retry it."""


class InsufficientBuyingPower(OrderRejected):
    """The account cannot pay for the order."""


class DuplicateOrder(OrderRejected):
    """An order with the same client_order_id already exists."""


class TradingHalted(TradingError):
    """The kill switch is engaged; new entries are refused."""
