"""Read-only settings from the `[config]` table of the handler's manifest."""

from typing import Dict, Optional

from . import _host


def get(key: str, default: Optional[str] = None) -> Optional[str]:
    """The setting `key`, or `default` when the manifest does not set it."""
    value = _host.config_get(key)
    return default if value is None else value


def get_int(key: str, default: int) -> int:
    """The setting `key` as an integer, or `default` when unset.

    Raises `weir.Permanent` (category `configuration`) when it is set but
    not an integer: a misconfigured handler cannot succeed by retrying.
    """
    value = _host.config_get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        from . import Category, Permanent

        raise Permanent(f"config {key} = {value!r} is not an integer", category=Category.CONFIGURATION) from None


def all() -> Dict[str, str]:  # noqa: A001
    """Every setting."""
    return dict(_host.config_all())
