"""runtime.util: scheduling strategies (and, with the actors issue, placement groups
and the state API)."""
from runtime.util import scheduling_strategies

__all__ = ["scheduling_strategies"]
