"""runtime.util: placement groups, scheduling strategies and the state API (``state``)."""
from runtime.util import scheduling_strategies
from runtime.util.placement_group import (PlacementGroup, get_current_placement_group,
                                          get_placement_group, placement_group,
                                          placement_group_table, remove_placement_group)

__all__ = ["scheduling_strategies", "state", "placement_group", "remove_placement_group",
           "get_placement_group", "placement_group_table", "get_current_placement_group",
           "PlacementGroup"]


def __getattr__(name):
    if name == "state":
        import importlib

        return importlib.import_module("runtime.util.state")
    raise AttributeError(name)
